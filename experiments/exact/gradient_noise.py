"""How the SDS gradient looks on a finished run's images, against exact samples of the same prompt (issue #12).

For the images of the first prompt of an exact-prior run (its ``model_samples.pt``) and as many exact samples of that
prompt, the script draws ``--draws`` noises at each t of ``--ts`` and prints, per CFG scale, the SDS gradient
of ``guidance=sds`` at CFG s (``(1 - abar_t) (eps_u + s (eps_c - eps_u) - eps)``, the official 2D code's), by
- ``|E g|``: RMS over pixels of its mean over the draws (the expected step);
- ``sd``: RMS over pixels of its standard deviation across the draws (what Adam's second moment also sees);
- ``k``: how much of the images' fine texture the expected step takes away, ``<HP(E g), HP(x0)> / |HP(x0)|^2`` with
  ``HP(x) = x - box3(x)``: > 0 removes it (gradient descent steps against ``g``), < 0 adds to it.

    python experiments/exact/gradient_noise.py outputs/<date>/<time>
    python experiments/exact/gradient_noise.py outputs/<date>/<time> --scales 100 --ts 300 500 --draws 64
    python experiments/exact/gradient_noise.py outputs/<date>/<time> --learned   # prior=learned's network's gradient
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdbridge.files import write_text  # noqa: E402
from sdbridge.guidance import SDSConfig, build_guidance  # noqa: E402
from sdbridge.metrics.exact import rms  # noqa: E402
from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior  # noqa: E402
from sdbridge.priors.learned import LearnedConfig, LearnedPrior  # noqa: E402
from sdbridge.schedules import UniformConfig, build_schedule  # noqa: E402


def high_pass(x: torch.Tensor) -> torch.Tensor:
    return x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def sds_draws(prior, x0: torch.Tensor, prompt: str, t: int, scale: float, draws: int, gen: torch.Generator):
    """The SDS gradient (``guidance=sds`` at CFG ``scale``, its official weighting) of every image of ``x0`` for
    ``draws`` noises at timestep ``t``: (draws, *x0.shape)."""
    sds = build_guidance(SDSConfig(scale=scale), prior, build_schedule(UniformConfig()), None)
    prompts = [prompt] * x0.shape[0]
    return torch.stack([sds(x0, prompts, 0, t=t, noise=torch.randn(x0.shape, generator=gen)).grad
                        for _ in range(draws)])


def summary(g: torch.Tensor, x0: torch.Tensor) -> dict[str, float]:
    """``mean`` (RMS of E g), ``sd`` (RMS of its std across draws) and ``k`` of the draws ``g`` on the images ``x0``."""
    mean = g.mean(0)
    k = float((high_pass(mean) * high_pass(x0)).sum() / high_pass(x0).pow(2).sum())
    return {"mean": rms(mean), "sd": rms(g.std(0)), "k": k}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run's directory (config.yaml, model_samples.pt)")
    parser.add_argument("--scales", type=float, nargs="+", default=[7.5, 40, 100])
    parser.add_argument("--ts", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--learned", action="store_true", help="the gradient of prior=learned (a network trained on "
                        "the run's world, sdbridge/priors/learned.py; trained first if not cached) in place of the "
                        "closed-form eps")
    parser.add_argument("--learned-dir", default=LearnedConfig.learned_dir, help="its cache (prior.learned_dir)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    cfg = OmegaConf.load(args.run / "config.yaml")
    if cfg.prompt.get("text") is not None or cfg.prompt.get("file"):
        sys.exit("the run must list its prompts in prompt.texts (the script reads the first one)")
    prompt, repeat = str(cfg.prompt.texts[0]), int(cfg.prompt.repeat)
    prior_cfg = OmegaConf.to_container(cfg.prior)
    if set(prior_cfg) - set(LearnedConfig.__dataclass_fields__):
        sys.exit(f"{args.run} is not an exact-world run (prior=analytic or prior=learned)")
    world = {k: v for k, v in prior_cfg.items() if k in AnalyticConfig.__dataclass_fields__}
    world["device"] = "cpu"
    if args.learned:
        prior = LearnedPrior(LearnedConfig(**world, learned_dir=args.learned_dir))
    else:
        prior = AnalyticPrior(AnalyticConfig(**world))
    images = torch.load(args.run / "model_samples.pt", weights_only=True)[:repeat].float()
    gen = torch.Generator().manual_seed(0)
    samples = prior.sample(prompt, repeat, gen).float()
    print(f"{prompt!r}: {repeat} images of {args.run} and {repeat} exact samples, {args.draws} noise draws per t")
    rows = []
    for name, x0 in (("exact samples", samples), ("the run's images", images)):
        for scale in args.scales:
            for t in args.ts:
                row = {"images": name, "scale": scale, "t": t,
                       **summary(sds_draws(prior, x0, prompt, t, scale, args.draws, gen), x0)}
                rows.append(row)
                print(f"{name:>16}  CFG {scale:>5g}  t {t:>4}:  |E g| {row['mean']:.2f}  sd {row['sd']:.2f}  "
                      f"k {row['k']:+.2f}", flush=True)
    if args.json is not None:
        write_text(args.json, json.dumps({"run": str(args.run), "learned": args.learned, "rows": rows},
                                         indent=1))
    return rows


if __name__ == "__main__":
    main()
