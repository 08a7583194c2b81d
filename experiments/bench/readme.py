"""The benchmark scripts' generated README blocks: text between two HTML-comment markers, replaced in place.

    <!-- bench:gpu-sd21_base_random:start -->
    ...written by experiments/bench/run.py --readme...
    <!-- bench:gpu-sd21_base_random:end -->

A block not in the README yet is appended at its end; placing an empty marker pair in the README beforehand puts it
where it belongs.
"""

from __future__ import annotations

from pathlib import Path

#: the option that points --readme at another copy of the README (gpu.sh --dry-run): not shown in the command line
README_PATH_OPTION = "--readme-path"


def write_block(path: Path, marker: str, text: str) -> None:
    """Replace (or append) the block ``<!-- {marker}:start -->`` ... ``<!-- {marker}:end -->`` of ``path``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in body:
        body = body[: body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.write_text(body)


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a block: ``python {script} ...``, arguments with spaces quoted, and without
    ``--readme-path PATH`` (where a copy was written is not part of the measurement)."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg.startswith(README_PATH_OPTION + "="):
            skip = False
            continue
        if arg == README_PATH_OPTION:
            skip = True
            continue
        shown.append(f"'{arg}'" if " " in arg else arg)
    return " ".join(["python", script, *shown])
