"""What DDIM at each CFG scale gives with the exact eps and with prior=learned's network, on the same 16 px world,
and what SDI's inversion finds with each (issue #12: SDI and sdi_cached distil DDIM at their CFG, 8.5 here, so the
sampler they distil sets their ceiling, and SDI's noise comes from a DDIM inversion at CFG -6.5).

- default: DDIM (50 steps, eta 0) from N(0, I) for the prompts at each ``--scales`` entry, seed 0, scored against the
  world's exact distributions (FD, saturation, adherence, collapse, sharpness: sdbridge/metrics/exact.py). Stable
  Diffusion's DDIM at CFG 7.5 is its standard sampler; a prior whose DDIM degrades there cannot show a method that
  distils it beating SDS.
- ``--inversion``: SDI's inversion (``guidance=sdi``'s defaults with ``--inversion-scales`` in place of its -6.5) of
  one exact sample per prompt and ``--images`` to each t of ``--ts``: the RMS of the noise kappa it finds (for
  N(0, I): 1) and of its target's error x0_hat - x0 (on the data, DDIM maps the inverted latent back near x0).

    python experiments/exact/cfg_sweep.py
    python experiments/exact/cfg_sweep.py --scales 1 3 8.5 --images 16 --json /tmp/cfg.json
    python experiments/exact/cfg_sweep.py --inversion --inversion-scales -6.5 1 --ts 300 500 700 900
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdbridge.files import write_text  # noqa: E402
from sdbridge.guidance import SDIConfig, build_guidance  # noqa: E402
from sdbridge.metrics.exact import exact_metrics, rms  # noqa: E402
from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior  # noqa: E402
from sdbridge.priors.learned import LearnedConfig, LearnedPrior  # noqa: E402
from sdbridge.sampling import ddim_sample  # noqa: E402
from sdbridge.schedules import UniformConfig, build_schedule  # noqa: E402

COLUMNS = ("fd", "saturation", "adherence", "collapse", "sharpness")


def ddim_rows(priors: dict, prompts: list[str], scales: list[float]) -> list[dict]:
    rows = []
    print(f"{'prior':>12} {'CFG':>5} " + " ".join(f"{c:>10}" for c in COLUMNS))
    for name, prior in priors.items():
        for scale in scales:
            gen = torch.Generator().manual_seed(0)
            images = ddim_sample(prior, prompts, num_steps=50, scale=scale, generator=gen)
            m = exact_metrics(prior, images, prompts)["mean"]
            rows.append({"prior": name, "scale": scale, **{c: float(m[c]) for c in COLUMNS}})
            print(f"{name:>12} {scale:>5g} " + " ".join(f"{m[c]:>10.3g}" for c in COLUMNS), flush=True)
    return rows


def inversion_rows(priors: dict, prompts: list[str], scales: list[float], ts: list[int]) -> list[dict]:
    """SDI's kappa and target error on exact samples of ``prompts``, per prior, inversion scale and t."""
    rows = []
    print(f"{'prior':>12} {'inv CFG':>8} {'t':>5} {'|kappa|':>8} {'|x0_hat - x0|':>14}")
    for name, prior in priors.items():
        gen = torch.Generator().manual_seed(0)
        x0 = torch.cat([prior.sample(p, 1, gen) for p in prompts]).float()
        for scale in scales:
            for t in ts:  # a generator per row (the inversion's jitter and eta noise): each row stands on its own
                sdi = build_guidance(SDIConfig(inversion_scale=scale), prior, build_schedule(UniformConfig()),
                                     torch.Generator().manual_seed(t))
                out = sdi(x0, prompts, 0, t=t)
                # w = sigma_t: the gradient is x0 - x0_hat; the output's noise is SDI's kappa
                row = {"prior": name, "inversion_scale": scale, "t": t, "kappa": rms(out.noise),
                       "target_error": rms(out.grad)}
                rows.append(row)
                print(f"{name:>12} {scale:>8g} {t:>5} {row['kappa']:>8.2f} {row['target_error']:>14.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", nargs="+", default=["a red circle", "a blue square"])
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 2, 3, 5, 8.5])
    parser.add_argument("--inversion", action="store_true", help="SDI's inversion instead of DDIM (docstring)")
    parser.add_argument("--inversion-scales", type=float, nargs="+", default=[-6.5, 1])
    parser.add_argument("--ts", type=int, nargs="+", default=[300, 500, 700, 900])
    parser.add_argument("--learned-dir", default=LearnedConfig.learned_dir, help="prior.learned_dir")
    parser.add_argument("--cache-dir", default=LearnedConfig.cache_dir, help="the world's cache (prior.cache_dir)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    net_config = LearnedConfig(device="cpu", learned_dir=args.learned_dir, cache_dir=args.cache_dir)
    world = {k: getattr(net_config, k) for k in AnalyticConfig.__dataclass_fields__}
    priors = {"closed form": AnalyticPrior(AnalyticConfig(**world)), "network": LearnedPrior(net_config)}
    prompts = [p for p in args.prompts for _ in range(args.images)]
    rows = (inversion_rows(priors, prompts, args.inversion_scales, args.ts) if args.inversion
            else ddim_rows(priors, prompts, args.scales))
    if args.json is not None:
        write_text(args.json, json.dumps({"prompts": args.prompts, "images": args.images, "inversion": args.inversion,
                                         "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
