"""Cost of one exact-eps evaluation on the exact prior (a benchmark, not a test).

    python experiments/bench/analytic.py            # writes the table into experiments/bench/README.md

Every prompt of the exact world uses all of its components (text tilts one shared mixture), so the cost depends on
the image size and on how many component sets a call evaluates: ms per image, batch 16, t = 500, for one
conditioning ("a red circle"), a CFG pair ("" and the prompt) and Bridge's stage-2 pair (the prompt with the
official source and target words: ten corrupted copies on the source side). Each size is measured for every variant
in ``VARIANTS`` in one run, interleaved, so the ratios are side by side: the code (float32 operands cleared of
subnormal values by ``sdbridge.priors.analytic.float32_normal``), a plain ``.float()`` (before 2026-12-03), and the
translation-equivariant world option ``prior.templates=8``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]

import torch

import sdbridge.priors.analytic as analytic
from sdbridge.guidance.bridge import SOURCE_MODIFIER, TARGET_MODIFIER
from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior

PROMPT = "a red circle"
CALLS = {"one conditioning": [PROMPT], "CFG pair": ["", PROMPT],
         "Bridge stage 2 pair": [PROMPT + SOURCE_MODIFIER, PROMPT + TARGET_MODIFIER]}
SIZES = (16, 32)
BATCH = 16


def bench(prior: AnalyticPrior, texts: list[str], repeats: int = 5) -> float:
    """ms per image of one ``predict_eps`` call with the conditionings ``texts`` (median of ``repeats``)."""
    x = torch.randn(BATCH, *prior.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((BATCH,), 500)
    conds = [prior.encode_text([p] * BATCH) for p in texts]
    prior.predict_eps(x, t, conds)  # warm-up (builds the prompts' mixtures)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        prior.predict_eps(x, t, conds)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / BATCH


@contextlib.contextmanager
def plain_casts(enabled: bool) -> Iterator[None]:
    """While ``enabled``: the exact prior's float32 casts as before 2026-12-03 (a plain ``.float()``, subnormal values
    kept), both the ones made when a prior or a prompt's sets are built and ``to_work``'s per-call ones."""
    normal = analytic.float32_normal
    if enabled:
        analytic.float32_normal = lambda v: v.float()
    try:
        yield
    finally:
        analytic.float32_normal = normal


#: The variants measured side by side: the code, its float32 casts as before 2026-12-03 (subnormal values kept), and
#: the translation-equivariant world option (``prior.templates``, sdbridge/priors/world.py).
VARIANTS = {"default": ({}, False), "float32 casts with subnormals": ({}, True),
            "prior.templates=8": ({"templates": 8}, False)}


def measure(size: int, rounds: int = 3) -> dict[str, list[float]]:
    """Per variant, per call kind: ms per image, median over rounds that interleave the variants."""
    priors = {}
    for name, (overrides, sub) in VARIANTS.items():
        with plain_casts(sub):
            priors[name] = AnalyticPrior(AnalyticConfig(size=size, device="cpu", **overrides))
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for kind, texts in CALLS.items():
            for name in order:
                with plain_casts(VARIANTS[name][1]):
                    results.setdefault((name, kind), []).append(bench(priors[name], texts))
    return {name: [statistics.median(results[(name, kind)]) for kind in CALLS] for name in VARIANTS}


def main() -> None:
    rows = []
    for size in SIZES:
        cells = measure(size)
        for name, values in cells.items():
            ratio = lambda v, ref: "" if name == "default" else f" ({v / ref:.2f}x)"  # noqa: E731
            rows.append(f"| {size} | {3 * size * size} | {name} | "
                        + " | ".join(f"{v:.2f}{ratio(v, ref)}" for v, ref in zip(values, cells["default"])) + " |")
            print(rows[-1], flush=True)
    table = "\n".join([
        "| S | D | variant | " + " | ".join(f"{kind}: ms/image" for kind in CALLS) + " |",
        "| ---: | ---: | --- |" + " ---: |" * len(CALLS),
        *rows,
    ])
    section = (
        "<!-- bench_analytic:start -->\n"
        f"Exact eps cost per image (world v2, batch {BATCH}, t = 500; {platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}); `python experiments/bench/analytic.py`. The variants are measured "
        "interleaved in the same run; in parentheses the ratio to the default: the float32 operands cast plainly, "
        "subnormal values kept (the code before 2026-12-03), and the translation-equivariant world option "
        f"(`prior.templates=8`):\n\n{table}\n"
        "<!-- bench_analytic:end -->"
    )
    readme = ROOT / "experiments" / "bench" / "README.md"
    text = readme.read_text() if readme.exists() else "# Experiments\n"
    if "<!-- bench_analytic:start -->" in text:
        text = re.sub(r"<!-- bench_analytic:start -->.*<!-- bench_analytic:end -->", section, text, flags=re.S)
    else:
        text += "\n## Exact prior: cost of the closed-form denoiser\n\n" + section + "\n"
    readme.write_text(text)
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()
