"""A denoiser *trained* on the exact world, used as the prior: does a trained network behave like the closed form
where SDS's failures from randn come from (issue #12)?

The exact world's eps is the Bayes-optimal denoiser of its mixture; a trained network only approximates it. This
script trains a small class-conditional UNet (one class per prompt, class 0 the empty prompt) on exact samples of
each prompt, then runs ``run.py`` with that network in place of the closed-form eps, so the same guidance code, the
same optimizer and the same exact metrics (FD, NLL, ... against the world's true distributions) read a trained
network's behaviour on the world it was trained on.

    python experiments/exact/learned_prior.py train --out /tmp/learned16.pt            # size 16 world, CPU minutes
    python experiments/exact/learned_prior.py run /tmp/learned16.pt guidance=sds guidance.scale=100 \\
        'prompt.texts=[a red circle,a blue square]' prompt.repeat=4

``run`` passes its other arguments to ``run.py``; the world (``prior.size`` and the rest) comes from the checkpoint.
Prompts the network was not trained on fail with the list of those it knows.
"""

from __future__ import annotations

import argparse
import copy
import math
import runpy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sdbridge.files import atomic_open  # noqa: E402
from sdbridge.guidance.bridge import SOURCE_MODIFIER, TARGET_MODIFIER  # noqa: E402
from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior  # noqa: E402
from sdbridge.priors.world import COLORS, SHAPES  # noqa: E402

#: the run prompts the network also learns with Bridge's source and target words
MODIFIED = ("a red circle", "a blue square")


def prompt_list() -> list[str]:
    concepts = [f"a {c} {s}" for s in SHAPES for c in COLORS]
    return [""] + concepts + [p + m for p in MODIFIED for m in (SOURCE_MODIFIER, TARGET_MODIFIER)]


def make_net(size: int, classes: int, channels: tuple[int, int] = (32, 64), layers: int = 1):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                       layers_per_block=layers, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=classes, norm_num_groups=16)


def dataset(prior: AnalyticPrior, prompts: list[str], per_prompt: int, gen: torch.Generator):
    x = torch.cat([prior.sample(p, per_prompt, gen).float().cpu() for p in prompts])
    y = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    return x, y


def train(args) -> None:
    torch.manual_seed(args.seed)
    world = {"size": args.size, "device": "cpu", "cache_dir": str(args.cache_dir)}
    prior = AnalyticPrior(AnalyticConfig(**world))
    prompts = prompt_list()
    net = make_net(args.size, len(prompts), args.channels, args.layers)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    start, losses = time.time(), []
    for step in range(args.steps):
        if step % args.refresh == 0:  # fresh exact samples: the network sees the distribution, not a fixed set
            x_all, y_all = dataset(prior, prompts, args.per_prompt, gen)
        idx = torch.randint(0, len(y_all), (args.batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        t = torch.randint(0, prior.num_train_timesteps, (args.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = (net(prior.add_noise(x0, eps, t), t, class_labels=y).sample - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - args.ema)
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}/{args.steps}  loss {sum(losses[-250:]) / 250:.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:.0f} s", flush=True)
    with atomic_open(args.out) as f:
        torch.save({"state_dict": ema.state_dict(), "prompts": prompts, "world": world, "steps": args.steps,
                    "channels": list(args.channels), "layers": args.layers}, f)
    print(f"saved {args.out}")
    report(prior, ema, prompts, gen)


@torch.no_grad()
def report(prior, net, prompts, gen, n: int = 256) -> None:
    """Diffusion loss of the network against the closed form's (the Bayes optimum) on fresh exact samples."""
    x0, y = dataset(prior, prompts, max(1, n // len(prompts)), gen)
    for t in (50, 100, 300, 500, 700, 900):
        tt = torch.full((len(y),), t)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = prior.add_noise(x0, eps, tt)
        net_loss = (net(x_t, tt, class_labels=y).sample - eps).pow(2).mean()
        exact = torch.cat([prior.predict_eps(x_t[y == i], tt[y == i], [prior.encode_text([p] * int((y == i).sum()))])[0]
                           for i, p in enumerate(prompts)])
        order = torch.cat([torch.nonzero(y == i).flatten() for i in range(len(prompts))])
        exact_loss = (exact - eps[order]).pow(2).mean()
        print(f"t {t:>3}: diffusion loss network {net_loss:.4f}, closed form {exact_loss:.4f}")


def install(checkpoint: Path) -> dict:
    """Replace the exact prior's closed-form eps by the trained network of ``checkpoint`` (for this process);
    returns the checkpoint (its ``world``: the AnalyticConfig fields it was trained on)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    prompts = ckpt["prompts"]
    classes = {p: i for i, p in enumerate(prompts)}
    net = make_net(ckpt["world"]["size"], len(prompts), ckpt["channels"], ckpt["layers"])
    net.load_state_dict(ckpt["state_dict"])
    net.eval().requires_grad_(False)

    def learned_eps(self, x_t, t, conds):
        if x_t.shape[-1] != ckpt["world"]["size"]:
            raise ValueError(f"the learned prior was trained on the size-{ckpt['world']['size']} world, not "
                             f"{x_t.shape[-1]} (leave prior.size to the checkpoint)")
        unknown = sorted({p for c in conds for p in c.prompts if p not in classes})
        if unknown:
            raise ValueError(f"the learned prior was not trained on {unknown}; it knows {prompts}")
        labels = torch.tensor([classes[p] for c in conds for p in c.prompts])
        with torch.no_grad():  # every conditioning in one batched call, as the SD prior does
            eps = net(x_t.float().repeat(len(conds), 1, 1, 1), t.repeat(len(conds)), class_labels=labels).sample
        return eps.view(len(conds), *x_t.shape).to(x_t.dtype)

    AnalyticPrior._predict_eps_batched = learned_eps
    return ckpt


def run(args, rest: list[str]) -> None:
    ckpt = install(args.checkpoint)
    world = [f"prior.{k}={v}" for k, v in ckpt["world"].items() if k != "device"]
    sys.argv = [str(ROOT / "run.py"), *world, *rest]
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        parser = argparse.ArgumentParser()
        parser.add_argument("checkpoint", type=Path)
        args, rest = parser.parse_known_args(sys.argv[2:])
        return run(args, rest)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, nargs=2, default=[32, 64])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--per-prompt", type=int, default=256)
    p.add_argument("--refresh", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=AnalyticConfig.cache_dir, help="the world's cache (prior.cache_dir)")
    train(parser.parse_args())


if __name__ == "__main__":
    main()
