"""How each way of varying lighting in the exact world reads and bounds contrast (issue #12).

For exact samples of "a red circle" in each world, the script prints
- the log-density cost of scaling a sample's color offset by k (its own variation and sensor noise kept), measured
  from the sample's own contrast level: whether a brighter-than-rendered disc is off the data, as in SD whose pixels
  clip;
- the posterior mass on circle and ring components of the same samples at half the rendered contrast, noised to t:
  whether a dim disc reads as a disc;
- RMS(eps_cond - eps_uncond) on noised exact samples: whether CFG still acts on settled images;
- ms per CFG-pair eps call for a batch of 16 (the CPU is shared by nothing else only if you make it so).

    python experiments/exact/lighting_probe.py
    python experiments/exact/lighting_probe.py --world contrast_levels=0.4,0.7,1 --world contrast_std=0.2

Each ``--world`` is one more world (AnalyticConfig fields, as ``make_table.py --world`` takes them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WORLDS = [[], ["contrast_std=0.35"], ["contrast_levels=0.5,0.75,1"], ["contrast_levels=0.5,0.6,0.7,0.8,0.9,1"]]
PROMPT = "a red circle"


def probe(prior, n: int, ks: tuple[float, ...], ts: tuple[int, ...]) -> dict[str, list[float]]:
    mix = prior.mixture(PROMPT)
    g = torch.Generator().manual_seed(0)
    z = prior.sample(PROMPT, n, g).reshape(n, -1).double()
    one = torch.ones(n, dtype=torch.float64)
    offset, level = mix.color_offsets(z)
    base = mix.log_prob(z, one)
    out = {"bright": [float((mix.log_prob(z + (k - 1) * offset, one) - base).median()) for k in ks]}
    half = z + (0.5 / level.view(-1, 1) - 1) * offset
    out["circle"], out["ring"], out["gap"] = [], [], []
    for t in ts:
        a = prior.alphas_cumprod[t].double()
        noise = torch.randn(half.shape, generator=g, dtype=torch.float64)
        for name in ("circle", "ring"):
            out[name].append(float(mix.shape_mass(a.sqrt() * half + (1 - a).sqrt() * noise, a.expand(n), name).mean()))
        xt = (a.sqrt() * z + (1 - a).sqrt() * noise).float().reshape(n, *prior.sample_shape)
        e = prior.predict_eps(xt, torch.full((n,), t), [prior.encode_text([""] * n), prior.encode_text([PROMPT] * n)])
        out["gap"].append(float((e[1] - e[0]).pow(2).mean().sqrt()))
    x = torch.randn(16, *prior.sample_shape, generator=g)
    conds = [prior.encode_text([""] * 16), prior.encode_text([PROMPT] * 16)]
    times = []
    for t in (900, 500, 100):
        prior.predict_eps(x, torch.full((16,), t), conds)
        start = time.perf_counter()
        for _ in range(10):
            prior.predict_eps(x, torch.full((16,), t), conds)
        times.append((time.perf_counter() - start) / 10 * 1000)
    out["ms"] = [sorted(times)[1]]
    return out


def main() -> None:
    from experiments.exact.make_table import world_config
    from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", nargs="+", action="append", metavar="KEY=VALUE", default=None,
                        help="one more world to probe (replaces the default list when given)")
    parser.add_argument("--n", type=int, default=16, help="exact samples per world")
    args = parser.parse_args()
    worlds = args.world or WORLDS
    configs = [world_config(pairs, parser) for pairs in worlds]  # every world checked before any runs
    ks, ts = (1.25, 1.5, 2.0, 3.0), (50, 100, 200, 400)
    print(f"| world | log p change at k = {' / '.join(map(str, ks))} | circle / ring mass of a half-contrast disc at "
          f"t = {' / '.join(map(str, ts))} | RMS(eps_c - eps_u) at t = {' / '.join(map(str, ts))} | ms per CFG pair |")
    print("| --- | --- | --- | --- | ---: |")
    for pairs, config in zip(worlds, configs):
        r = probe(AnalyticPrior(AnalyticConfig(device="cpu", **config)), args.n, ks, ts)
        pair = " / ".join(f"{c:.2f}, {g:.2f}" for c, g in zip(r["circle"], r["ring"]))
        print(f"| {' '.join(pairs) or 'default'} | {' / '.join(f'{v:.4g}' for v in r['bright'])} | {pair} | "
              f"{' / '.join(f'{v:.3f}' for v in r['gap'])} | {r['ms'][0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
