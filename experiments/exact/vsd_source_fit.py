"""How well VSD's online source fits the images it is optimizing, on the exact prior (issue #12's open VSD claim).

    python experiments/exact/vsd_source_fit.py                       # "a red circle", 16 images, 1000 steps
    python experiments/exact/vsd_source_fit.py --steps 300 --at 1 100 300 --channels 32

At the given steps of a VSD run (the science check's protocol: one prompt, 16 images from N(0, I), VSD's defaults),
the current images x0 are noised at t in ``--t`` (8 noise draws each) and three denoisers are scored by the diffusion
loss per pixel, E|eps(x_t) - n|^2:

* **prior**: the exact eps of the prompt (what VSD's source starts from);
* **source**: VSD's trained source (prior + residual network);
* **particles**: the exact eps of the empirical distribution of the current images (a mixture of deltas), i.e. the
  score VSD's source is meant to approximate (the variational distribution is the particles).

``closed`` = (prior - source) / (prior - particles): the share of the gap between the prior and the particles' score
that the source has learned (1: all of it; 0: none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from sdbridge.eval.protocol import compose_run_config  # noqa: E402
from sdbridge.runner import run  # noqa: E402


@torch.no_grad()
def losses(pl, ts, draws: int = 8, seed: int = 123) -> dict[str, dict[str, float]]:
    guidance, prior, prompts = pl.guidance, pl.prior, pl.prompts
    x0 = pl.target.model_samples().float()
    flat = x0.flatten(1)
    gen = torch.Generator().manual_seed(seed)
    cond = prior.encode_text(list(prompts))
    out = {}
    for t_value in ts:
        t = torch.full((x0.shape[0],), t_value)
        a = float(prior.abar(t[:1]))
        acc = {"prior": 0.0, "source": 0.0, "particles": 0.0}
        for _ in range(draws):
            n = torch.randn(x0.shape, generator=gen)
            x_t = prior.add_noise(x0, n, t)
            eps = {"prior": prior.predict_eps(x_t, t, [cond])[0],
                   "source": guidance.source(x_t, t, guidance.source_prompts(prompts),
                                             guidance.camera(prompts, x_t.device))[0].float()}
            # one prompt: every image is a particle of the same conditional distribution
            d2 = ((x_t.flatten(1)[:, None] - math.sqrt(a) * flat[None]) ** 2).sum(-1) / (2 * (1 - a))
            x0_hat = torch.softmax(-d2, dim=1) @ flat
            eps["particles"] = ((x_t.flatten(1) - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)).view_as(n)
            for k, e in eps.items():
                acc[k] += float(((e - n) ** 2).mean()) / draws
        gap = acc["prior"] - acc["particles"]
        acc["closed"] = (acc["prior"] - acc["source"]) / gap if gap > 0 else float("nan")
        out[str(t_value)] = acc  # str keys: the JSON record reads back equal
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--at", type=int, nargs="+", default=[1, 100, 300, 1000], help="steps to measure at")
    parser.add_argument("--t", type=int, nargs="+", default=[50, 200, 400, 600, 800])
    parser.add_argument("--channels", type=int, default=None, help="guidance.residual_channels (default: VSD's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="more run overrides (e.g. prior.cache_dir=...)")
    args = parser.parse_args(argv)
    rows = []

    class Measure(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in args.at:
                result = losses(pl_module, args.t)
                rows.append({"step": trainer.global_step, "losses": result})
                print(f"step {trainer.global_step}: " + "; ".join(
                    f"t {t}: prior {v['prior']:.4f} source {v['source']:.4f} particles {v['particles']:.4f} "
                    f"closed {v['closed']:.2f}" for t, v in result.items()), flush=True)

    overrides = ["prior=analytic", "guidance=vsd", f"prompt.texts=[{args.prompt}]", f"prompt.repeat={args.images}",
                 f"trainer.max_steps={args.steps}", "seed=0", "trainer.progress_bar=false",
                 "trainer.checkpoint_every=0", "trainer.save_every=0", "logger=none"]
    if args.channels:
        overrides.append(f"guidance.residual_channels={args.channels}")
    overrides += args.overrides
    config, _ = compose_run_config(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(config, Path(tmp), callbacks=[Measure()])
    print("final exact metrics:", json.dumps(summary["exact_metrics"]["mean"]))
    if args.json:
        args.json.write_text(json.dumps({"overrides": overrides, "rows": rows,
                                         "final": summary["exact_metrics"]["mean"]}, indent=1))
    return rows


if __name__ == "__main__":
    main()
