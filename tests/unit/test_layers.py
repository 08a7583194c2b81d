"""The package's layers: every import in sdbridge/ (top-level or inside a function) goes to the same layer or a lower
one, and no modules import each other in a circle. The order is the README's Layout section."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sdbridge"

#: bottom to top; a module belongs to the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("sdbridge", "sdbridge.files", "sdbridge.rng", "sdbridge.media", "sdbridge.prompts", "sdbridge.views"),  # foundations
    ("sdbridge.priors",),  # diffusion priors, the exact world
    ("sdbridge.sampling", "sdbridge.schedules"),  # DDIM, timestep schedules
    ("sdbridge.guidance", "sdbridge.targets"),  # the one formula and its methods; what is optimized
    ("sdbridge.metrics",),  # exact metrics, FID
    ("sdbridge.system", "sdbridge.callbacks"),  # the training step, observers of a run
    ("sdbridge.config",),  # typed configs of every group
    ("sdbridge.runner",),  # build and train one run
    ("sdbridge.eval",),  # harness: protocols and tables that run methods
    ("sdbridge.cli",),  # Hydra entry point
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The sdbridge modules ``path`` imports (``from sdbridge import rng`` is the module sdbridge.rng)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sdbridge")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([base] if base else [])])
            if base.split(".")[0] != "sdbridge":
                continue
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found.update(subs or {base})
    return found - {name}


def layer_of(name: str) -> int:
    best, layer = -1, None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer is not None, f"{name} is in no layer: add it to LAYERS and the README's Layout section"
    return layer


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer_and_imports_only_downward():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in sorted(graph().items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail(tmp_path):
    """A planted upward import and a planted cycle are reported (the walker reads the code, not a fixed list)."""
    fake = tmp_path / "sdbridge"
    (fake / "priors").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "priors" / "__init__.py").write_text("")
    (fake / "priors" / "low.py").write_text("def f():\n    from sdbridge.runner import run\n")
    (fake / "runner.py").write_text("from sdbridge.priors import low\n")
    (fake / "rng.py").write_text("from . import media\n")
    (fake / "media.py").write_text("from sdbridge import rng\n")
    real = globals()["PACKAGE"]
    globals()["PACKAGE"] = fake
    try:
        with pytest.raises(AssertionError, match="sdbridge.priors.low .* imports sdbridge.runner"):
            test_every_module_has_a_layer_and_imports_only_downward()
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
    finally:
        globals()["PACKAGE"] = real
