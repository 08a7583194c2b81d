"""How accurate the full bridge's two PF-ODEs are on each DDIM grid (``guidance.bridge_grid``), on the exact prior.

    python experiments/exact/bridge_grid.py                    # 8 exact samples and 8 N(0, 1) images
    python experiments/exact/bridge_grid.py --t 100 500 900 --steps 10 20

The full bridge (``full_bridge=true``) inverts x0 to t with eps_src and generates back with eps_tgt; its gradient is
x0 minus the result. Its DDIM discretization is scored against the same bridge on a fine grid (``per_sample`` with
``--reference`` steps), at each t for every image:

* **round trip**: eps_src = eps_tgt (CSD at scale 1 with the prompt as negative text), where the exact bridge is 0:
  RMS of the gradient (pure discretization error);
* **guided**: eps_tgt = CFG 7.5, eps_src = the unconditional prediction (CSD at 7.5, a full bridge that moves the
  image): RMS of the gradient's difference to the fine grid's, relative to the fine grid's RMS;
* **evaluations**: the sample-evaluations of the denoiser per image (``rows``: what a batched step costs on a prior
  whose cost grows with the batch, as the exact prior's and a UNet's do), against ``NFEs``, the calls.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from sdbridge.guidance.csd import CSD, CSDConfig  # noqa: E402
from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior  # noqa: E402
from sdbridge.schedules import UniformConfig, build_schedule  # noqa: E402


class Counting:
    """Counts the sample-rows the prior evaluates (each conditioning of each sample once)."""

    def __init__(self, prior):
        self.prior, self.rows = prior, 0
        self._predict = prior.predict_eps

        def predict(x_t, t, conds, weights=None):
            self.rows += x_t.shape[0] * len(conds)
            return self._predict(x_t, t, conds, weights)

        prior.predict_eps = predict


def bridge(prior, counter, x0, prompt, t, scale, negative, steps, grid):
    g = CSD(CSDConfig(scale=scale, negative_prompt=negative, full_bridge=True, bridge_steps=steps, bridge_grid=grid),
            prior, build_schedule(UniformConfig()), torch.Generator().manual_seed(0))
    g.setup(1000)
    g.prepare([prompt] * len(x0))
    rows_before = counter.rows
    out = g(x0, [prompt] * len(x0), 0, t=t)
    return out.grad.double(), out.nfe, (counter.rows - rows_before) / len(x0)


def rms(v: torch.Tensor) -> float:
    return float(v.pow(2).mean().sqrt())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--t", type=int, nargs="+", default=[50, 200, 400, 600, 800, 950])
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--reference", type=int, default=100, help="per_sample steps of the fine grid")
    args = parser.parse_args(argv)
    prior = AnalyticPrior(AnalyticConfig())
    counter = Counting(prior)
    images = {"exact samples": prior.sample(args.prompt, args.images, torch.Generator().manual_seed(0)).float(),
              "N(0, 1)": torch.randn(args.images, *prior.sample_shape, generator=torch.Generator().manual_seed(0))}
    grids = [(grid, n) for n in args.steps for grid in ("per_sample", "fixed")]
    print("| images | t | " + " | ".join(f"{g} {n}: round trip, guided error, NFEs, rows" for g, n in grids) + " |")
    print("|" + " --- |" * (2 + len(grids)))
    for name, x0 in images.items():
        for tv in args.t:
            t = torch.full((len(x0),), tv)
            ref = bridge(prior, counter, x0, args.prompt, t, 7.5, "", args.reference, "per_sample")[0]
            cells = []
            for grid, n in grids:
                trip = bridge(prior, counter, x0, args.prompt, t, 1.0, args.prompt, n, grid)[0]
                guided, nfe, rows = bridge(prior, counter, x0, args.prompt, t, 7.5, "", n, grid)
                cells.append(f"{rms(trip):.4f}, {rms(guided - ref) / rms(ref):.3f}, {nfe}, {rows:.0f}")
            print(f"| {name} | {tv} | " + " | ".join(cells) + f" |  (fine-grid RMS {rms(ref):.3f})", flush=True)


if __name__ == "__main__":
    main()
