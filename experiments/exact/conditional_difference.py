"""How well ``prior=learned``'s network knows the *differences* between conditionings that score distillation
multiplies by its guidance scale, against the exact world's (issue #12).

On exact samples of each prompt, noised at t (the same noise for both priors), it compares the network's and the closed
form's
- ``bridge``: eps(y + Bridge's target words) - eps(y + its source words), what Bridge's stage 2 steps along (x 40);
- ``cfg``: eps(y) - eps(""), what CFG amplifies (x 7.5 to 100);
- ``<word>``: eps(y) - eps(y + word), one source word at a time,
by the RMS over pixels of the exact difference and of the network's, the RMS of their gap (the network's error in the
difference) and their cosine; and, for each, whether a descent step along it adds or removes the image's color (the
cosine between the step and the image's chroma, exact | network). On exact samples the exact Bridge difference vanishes at small t (the posterior knows
the image is clean), so what the network puts there is its own error, which the guidance scale multiplies.

    python experiments/exact/conditional_difference.py                        # the default network (prior=learned)
    python experiments/exact/conditional_difference.py prior.train_target=exact   # one distilled from the exact eps
    python experiments/exact/conditional_difference.py --ts 100 500 900 --n 128 --json out.json

Arguments ``field=value`` are ``prior=learned``'s fields (the network is trained first if it is not cached).
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
from sdbridge.guidance.bridge import SOURCE_MODIFIER, TARGET_MODIFIER  # noqa: E402
from sdbridge.metrics.exact import rms  # noqa: E402
from sdbridge.priors.analytic import AnalyticPrior  # noqa: E402
from sdbridge.priors.learned import LearnedPrior, config_from_dotlist  # noqa: E402


def pairs(prompt: str, words: list[str]) -> dict[str, tuple[str, str]]:
    """The conditioning pairs (a, b) whose eps(a) - eps(b) is compared."""
    out = {"bridge": (prompt + TARGET_MODIFIER, prompt + SOURCE_MODIFIER), "cfg": (prompt, "")}
    out.update({word: (prompt, f"{prompt}, {word}") for word in words})
    return out


def chroma_cosine(prior: LearnedPrior, x0: torch.Tensor, d: torch.Tensor) -> float:
    """How much a step along ``-d`` (a descent step on ``grad = w s d``: ``d = eps(a) - eps(b)`` moves the image
    toward ``a``, away from ``b``) adds to each image's color: the cosine between ``-d`` and the image's chroma (its
    pixels minus their gray), per image, averaged. Below 0 the step takes color out; ``scale`` is a scalar, so the
    cosine is the same in model and pixel units."""
    chroma = prior.to_pixels(x0.double())
    chroma = (chroma - chroma.mean(1, keepdim=True)).flatten(1)
    step = -(d - d.mean(1, keepdim=True)).flatten(1)  # the step's own gray part leaves the chroma unchanged
    return float(((step * chroma).sum(1) / (step.norm(dim=1) * chroma.norm(dim=1)).clamp(min=1e-30)).mean())


@torch.no_grad()
def compare(prior: LearnedPrior, prompts: list[str], words: list[str], ts: list[int], n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in prompts:
        x0 = prior.sample(prompt, n, gen).float()
        for t in ts:
            tt = torch.full((n,), t, dtype=torch.long)
            x_t = prior.add_noise(x0, torch.randn(x0.shape, generator=gen), tt)
            compared = pairs(prompt, words)
            texts = list(dict.fromkeys(text for pair in compared.values() for text in pair))  # each text once
            conds = [prior.encode_text([text] * n) for text in texts]
            net = dict(zip(texts, prior._predict_eps_batched(x_t, tt, conds).double()))  # one batched call
            exact = dict(zip(texts, AnalyticPrior._predict_eps_batched(prior, x_t, tt, conds).double()))
            for name, (a, b) in compared.items():
                d_net, d_exact = net[a] - net[b], exact[a] - exact[b]
                cos = float((d_net * d_exact).sum() / (d_net.norm() * d_exact.norm()).clamp(min=1e-30))
                rows.append({"prompt": prompt, "pair": name, "t": t, "exact": rms(d_exact), "network": rms(d_net),
                             "error": rms(d_net - d_exact), "cos": cos,
                             "chroma_exact": chroma_cosine(prior, x0, d_exact),
                             "chroma_network": chroma_cosine(prior, x0, d_net)})
    return rows


def print_table(rows: list[dict], words: list[str], ts: list[int], *columns: tuple[str, str]) -> None:
    """One line per difference, one cell per t: each ``(key, format)`` column's mean over the prompts."""
    for name in pairs("", words):
        cells = []
        for t in ts:
            sel = [r for r in rows if r["pair"] == name and r["t"] == t]
            cells.append(f"t {t}: " + " | ".join(format(sum(r[k] for r in sel) / len(sel), fmt) for k, fmt in columns))
        print(f"{name:>14}  " + "   ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fields", nargs="*", help="prior=learned fields, field=value")
    parser.add_argument("--prompts", nargs="+", default=["a red circle", "a blue square"])
    parser.add_argument("--words", nargs="*", default=["blurry", "smooth", "oversaturated", "pixelated"],
                        help="single source words compared one at a time")
    parser.add_argument("--ts", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    parser.add_argument("--n", type=int, default=64, help="exact samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    config = config_from_dotlist(args.fields)
    prior = LearnedPrior(config)
    print(f"network {prior.checkpoint['file']}; {args.n} exact samples per prompt, RMS over pixels "
          "(mean over prompts): exact difference | network's | their gap | cosine")
    rows = compare(prior, args.prompts, args.words, args.ts, args.n, args.seed)
    print_table(rows, args.words, args.ts, ("exact", ".3f"), ("network", ".3f"), ("error", ".3f"), ("cos", "+.2f"))
    print("color: the cosine between a step along -(eps(a) - eps(b)) and the image's chroma (< 0: it takes color out), "
          "exact | network")
    print_table(rows, args.words, args.ts, ("chroma_exact", "+.2f"), ("chroma_network", "+.2f"))
    if args.json is not None:
        write_text(args.json, json.dumps({"config": config.spec(), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
