"""Which color CFG pushes a NeRF's initial gray blob toward, on the exact prior (issue #12: the "red ball" test).

The NeRF science check (tests/science/test_nerf_claims.py) renders 12 turntable views of the initial field (the
Magic3D blob, gray, on a learned env-map background) and runs SDS for "a red ball". This script takes those initial
renders, noises them at each t and prints, for the centre 8x8 pixels, the CFG push ``x0(cond) - x0(uncond)`` (model
units, per channel, averaged over views and noise draws) and, at the last t, the two x0 predictions in [0, 1] RGB.
An R, G, B push of equal size is a colorless brightening; the prompt's red would raise R and lower G and B.

    python experiments/exact/nerf_color_push.py                          # the world's defaults
    python experiments/exact/nerf_color_push.py prior.text_pull=0        # without the shape pull
    python experiments/exact/nerf_color_push.py --draws 32 --t 300 500 700 800 900 950
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: the science check's NeRF settings (tests/science/test_nerf_claims.py)
NERF_OVERRIDES = ["target=nerf", "guidance=sds", "target.cameras.eval_views=12", "target.renderer.num_samples=32",
                  "target.renderer.background=envmap"]
CENTRE = (slice(None), slice(None), slice(12, 20), slice(12, 20))


def color_push(overrides: list[str], ts: list[int], draws: int, seed: int = 1) -> dict:
    """``{"initial": centre RGB of the renders, "push": {t: (3,) mean CFG push}, "x0": {"cond", "uncond"} centre
    RGB at ts[-1]}``."""
    from sdbridge.eval.protocol import compose_run_config
    from sdbridge.priors import build_prior
    from sdbridge.prompts import load_prompt_set
    from sdbridge.targets.nerf.target import NeRFTarget

    config, _ = compose_run_config([*NERF_OVERRIDES, *overrides])
    prior = build_prior(config.prior)
    prompts = load_prompt_set(config.prompt).texts
    nerf = NeRFTarget(config.target, prior, 1, torch.Generator().manual_seed(config.seed), prompts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = nerf.model_samples()
        n = x0.shape[0]
        cond, uncond = prior.encode_text([prompts[0]] * n), prior.encode_text([""] * n)
        out = {"prompt": prompts[0], "initial": prior.decode(x0)[CENTRE].mean((0, 2, 3)).tolist(), "push": {}}
        for t in ts:
            tt = torch.full((n,), t, dtype=torch.long)
            push, x0c, x0u = torch.zeros(3), torch.zeros(3), torch.zeros(3)
            for _ in range(draws):
                x_t = prior.add_noise(x0, torch.randn(x0.shape, generator=generator), tt)
                eps = prior.predict_eps(x_t, tt, [cond, uncond])  # (2, n, ...): conditional, unconditional
                xc, xu = (prior.eps_to_x0(e, x_t, tt) for e in eps)  # the two x0 predictions
                push += (xc - xu)[CENTRE].mean((0, 2, 3)).cpu() / draws
                x0c += prior.decode(xc)[CENTRE].mean((0, 2, 3)).cpu() / draws
                x0u += prior.decode(xu)[CENTRE].mean((0, 2, 3)).cpu() / draws
            out["push"][t] = push.tolist()
        out["x0"] = {"t": ts[-1], "cond": x0c.tolist(), "uncond": x0u.tolist()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run config (e.g. prior.text_pull=0)")
    parser.add_argument("--t", type=int, nargs="+", default=[300, 500, 700, 800, 900, 950])
    parser.add_argument("--draws", type=int, default=32, help="noise draws per t")
    args = parser.parse_args(argv)
    out = color_push(args.overrides, args.t, args.draws)
    fmt = lambda v: "(" + ", ".join(f"{x:.3f}" for x in v) + ")"  # noqa: E731
    print(f"prompt {out['prompt']!r}; initial renders' centre RGB {fmt(out['initial'])}")
    for t, push in out["push"].items():
        print(f"t = {t:4d}: CFG push x0(cond) - x0(uncond) at the centre, model units (R, G, B) {fmt(push)}")
    x0 = out["x0"]
    print(f"t = {x0['t']:4d}: centre RGB of x0(cond) {fmt(x0['cond'])}, of x0(uncond) {fmt(x0['uncond'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
