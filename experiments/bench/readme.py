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


def block_key(device: str, prior: str, latent_size: int | None = None, quick: bool = False) -> str:
    """The part of a block's marker that says where it was measured: ``cpu-tiny_sd``, ``gpu-sd21_base_random``,
    ``cpu-sd21_base_random-latent24``, so that a GPU run never overwrites a CPU table nor one scale another."""
    return (("gpu-" if device == "cuda" else "cpu-") + prior
            + ("" if latent_size is None else f"-latent{latent_size}") + ("-quick" if quick else ""))


#: options that say only where results go (a README copy, a JSON record): left out of a block's command line
OUTPUT_OPTIONS = (README_PATH_OPTION, "--json", "--out")


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a block: ``python {script} ...``, arguments with spaces quoted, and without the
    output-only options (``--readme-path``, ``--json``, ``--out`` and their paths: where a copy or a record was
    written is not part of the measurement)."""
    shown, skip = [], False
    for arg in argv:
        if skip or any(arg.startswith(option + "=") for option in OUTPUT_OPTIONS):
            skip = False
            continue
        if arg in OUTPUT_OPTIONS:
            skip = True
            continue
        shown.append(f"'{arg}'" if " " in arg else arg)
    return " ".join(["python", script, *shown])
