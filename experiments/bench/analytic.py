"""Cost of one exact-eps evaluation per image on the exact prior (a benchmark, not a test).

    python experiments/bench/analytic.py            # writes the table into experiments/bench/README.md

The exact eps of a K-component mixture of rank-r Gaussians in D dimensions costs O(K D r) per image. This measures
ms per image for prompts selecting 1, 6 and 36 components, at image sizes 16, 32 and 64, batch 16, on the CPU.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]

import torch

from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior

PROMPTS = {"a red circle": 1, "a circle": 6, "": 36}


def bench(prior: AnalyticPrior, prompt: str, batch: int = 16, repeats: int = 10) -> float:
    x = torch.randn(batch, *prior.sample_shape)
    t = torch.full((batch,), 500)
    cond = [prior.encode_text([prompt] * batch)]
    prior.predict_eps(x, t, cond)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        prior.predict_eps(x, t, cond)
    return 1000 * (time.perf_counter() - start) / (repeats * batch)


def main() -> None:
    rows = []
    for size in (16, 32, 64):
        prior = AnalyticPrior(AnalyticConfig(size=size, device="cpu"))
        cells = [f"{bench(prior, p):.2f}" for p in PROMPTS]
        rows.append(f"| {size} | {3 * size * size} | " + " | ".join(cells) + " |")
        print(rows[-1])
    table = "\n".join([
        "| S | D | " + " | ".join(f"K={k} ms/image" for k in PROMPTS.values()) + " |",
        "| ---: | ---: |" + " ---: |" * len(PROMPTS),
        *rows,
    ])
    section = (
        "<!-- bench_analytic:start -->\n"
        f"Exact eps cost per image (rank 32, batch 16, t = 500; {platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}); `python experiments/bench/analytic.py`:\n\n{table}\n"
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
