"""Calibration of the exact world: does it behave like a latent text-to-image model where the methods rely on it?

    python experiments/exact/calibrate.py                    # the default world, writes calibration.json
    python experiments/exact/calibrate.py --compare-old REV  # also the world of git revision REV (round 1: c50cb2a)

Each property of ``experiments/exact/README.md``'s calibration table is measured here, on the prior through its
public interface (``predict_eps``, ``sample``, ``mixture``), so the same code measures an older world: with
``--compare-old`` the ``sdbridge`` package of that revision is exported from git to a temporary folder (as
``sdbridge_old``) and measured beside the current one. Images of both worlds are classified by the current world's
nearest-template classifier (same shapes and colors).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdbridge.guidance.bridge import SOURCE_MODIFIER, TARGET_MODIFIER
from sdbridge.metrics.exact import rms

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "a blue square", "a circle"]
SOURCE, TARGET = SOURCE_MODIFIER, TARGET_MODIFIER  # the Bridge's 2D modifier words
TIMESTEPS = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]


def load_old(rev: str, folder: Path):
    """The exact prior of git revision ``rev``, imported as ``sdbridge_old``."""
    target = folder / "sdbridge_old"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "sdbridge"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "sdbridge").rename(target)
    for f in target.rglob("*.py"):
        f.write_text(f.read_text().replace("sdbridge.", "sdbridge_old.").replace("from sdbridge import",
                                                                                   "from sdbridge_old import"))
    spec = importlib.util.spec_from_file_location("sdbridge_old", target / "__init__.py",
                                                  submodule_search_locations=[str(target)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["sdbridge_old"] = package  # its submodules import each other by this name
    spec.loader.exec_module(package)
    analytic = importlib.import_module("sdbridge_old.priors.analytic")
    return analytic.AnalyticPrior(analytic.AnalyticConfig(device="cpu"))


def pixels(prior, z: torch.Tensor) -> torch.Tensor:
    """Model units to pixel units [-1, 1] (the round-1 world's model space is the pixel space)."""
    return prior.to_pixels(z) if hasattr(prior, "to_pixels") else z


def eps(prior, x, t, prompts):
    tt = torch.full((x.shape[0],), int(t))
    return prior.predict_eps(x.float(), tt, [prior.encode_text(list(prompts))])[0]


def measure(prior, classifier, new_prior, n: int = 64) -> dict:
    from sdbridge.priors.world import COLORS, SHAPES, render_shapes
    from sdbridge.sampling import ddim_sample

    out: dict = {}
    gen = torch.Generator().manual_seed(0)
    # 1. samples are the concept: classifier accuracy over all 36 concepts, and the Laplacian energy of exact samples
    # against fresh renderings of the same concept (the world's own rendering ranges for the round-1 world)
    world = sys.modules[type(prior).__module__.replace("analytic", "world")]  # the measured world's own shapes
    shared = [shape for shape in world.SHAPES if shape in SHAPES]  # the classifier knows the current world's shapes
    correct, total, energy_ratio = 0, 0, []
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    hf = lambda x: float((torch.nn.functional.conv2d(x.float(), lap, padding=1, groups=3) ** 2).mean())  # noqa: E731
    render = getattr(world, "render_shapes", render_shapes)
    for shape in shared:
        for color in COLORS:
            z = prior.sample_concept(shape, color, 16, gen) if hasattr(prior, "sample_concept") else \
                prior.sample(f"a {color} {shape}", 16, gen)
            pred = classifier.classify(new_prior.from_pixels(pixels(prior, z)))
            correct += sum(c == (shape, color) for c in pred.concepts())
            total += z.shape[0]
            ref = render(shape, color, 64, prior.config.size, torch.Generator().manual_seed(7))
            noise = getattr(prior.config, "noise_floor", 0.0) * getattr(prior, "scale", 1.0)  # the sensor noise
            ref = ref + noise * torch.randn(ref.shape, generator=torch.Generator().manual_seed(8))
            energy_ratio.append(hf(pixels(prior, z)) / hf(ref))
    out["classified_correctly"] = correct / total
    out["edge_energy_vs_renders"] = sum(energy_ratio) / len(energy_ratio)
    # 2. text tilts: DDIM adherence at CFG 1 and 7.5 and the size of eps_cond - eps_uncond along CFG 7.5 trajectories
    adherence = {}
    for scale in (1.0, 3.0, 7.5):
        hits = 0
        for p in PROMPTS:
            z = ddim_sample(prior, [p] * n, num_steps=50, scale=scale, generator=torch.Generator().manual_seed(1))
            hits += classifier.adherence(new_prior.from_pixels(pixels(prior, z)), new_prior.mixture(p).concepts)[0]
        adherence[str(scale)] = hits / len(PROMPTS)
    out["ddim_adherence_by_cfg"] = adherence
    # 3. a latent-like model space: data scale, and exact eps of a randn "image" relative to the noise it carries
    z = prior.sample("", 512, gen)
    out["data_rms"] = rms(z)
    ratio = {}
    for t in (1, 20, 100, 500):
        a = prior.alphas_cumprod[t].float()
        noise = torch.randn(n, *prior.sample_shape, generator=gen)
        x0 = torch.randn(n, *prior.sample_shape, generator=gen)
        ratio[str(t)] = rms(eps(prior, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, [""] * n)) / rms(noise)
    out["randn_eps_over_noise"] = ratio
    # 4. text-defined sources are mixtures: log p(y + target words) - log p(y + source words) at t = 0, max over
    # exact samples, randn images and blurred samples (what SDS produces)
    base = "a red circle"
    tgt, src = prior.mixture(base + TARGET), prior.mixture(base + SOURCE)
    z = prior.sample(base, n, gen)
    blurred = torch.nn.functional.avg_pool2d(z, 5, stride=1, padding=2, count_include_pad=False)
    logratio = {}
    for name, x in (("exact samples", z), ("randn", torch.randn(z.shape, generator=gen)), ("blurred samples", blurred)):
        xf = x.reshape(n, -1).double()
        logratio[name] = float((tgt.log_prob(xf) - src.log_prob(xf)).max())
    out["max_log_ratio_tgt_src"] = logratio
    # 5. generalization: effective number of components of the posterior (exp entropy), and the CFG gap, against t
    mix, cond = prior.mixture(""), prior.mixture(base)
    z = prior.sample(base, n, gen)
    perplexity, gap = {}, {}
    for t in TIMESTEPS:
        a = prior.alphas_cumprod[t]
        x = (a.sqrt() * z.double() + (1 - a).sqrt() * torch.randn(z.shape, generator=gen, dtype=torch.float64))
        r = mix.responsibilities(x.reshape(n, -1), a.expand(n))
        perplexity[str(t)] = float(torch.exp(-(r * r.clamp_min(1e-300).log()).sum(1)).mean())
        e_c, e_u = eps(prior, x, t, [base] * n), eps(prior, x, t, [""] * n)
        gap[str(t)] = rms(e_c - e_u)
    out["posterior_components_by_t"] = perplexity
    out["cfg_gap_rms_by_t"] = gap
    del cond
    # 6. cost: ms per eps evaluation, batch 16, one conditioning and a CFG pair
    x = torch.randn(16, *prior.sample_shape, generator=gen)
    tt = torch.full((16,), 500)
    for name, conds in (("ms_per_eval_b16", [[base] * 16]), ("ms_per_cfg_pair_b16", [[""] * 16, [base] * 16])):
        emb = [prior.encode_text(c) for c in conds]
        prior.predict_eps(x, tt, emb)
        start = time.perf_counter()
        for _ in range(5):
            prior.predict_eps(x, tt, emb)
        out[name] = 1000 * (time.perf_counter() - start) / 5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-old", metavar="REV", default=None, help="also measure the world of this revision")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "exact" / "calibration.json")
    args = parser.parse_args()
    from sdbridge.metrics.classify import classifier_for
    from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior

    prior = AnalyticPrior(AnalyticConfig(device="cpu"))
    classifier = classifier_for(prior)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["current"] = measure(prior, classifier, prior)
    print(json.dumps(results["current"], indent=1))
    if args.compare_old:
        with tempfile.TemporaryDirectory() as tmp:
            old = load_old(args.compare_old, Path(tmp))
            results[f"old ({args.compare_old})"] = measure(old, classifier, prior)
            print(json.dumps(results[f"old ({args.compare_old})"], indent=1))
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    write_table(results, args.out.with_name("README.md"))


def write_table(results: dict, readme: Path) -> None:
    """The calibration table (between its markers) in experiments/exact/README.md."""
    cols = list(results)

    def row(label, get, fmt="{:.3g}"):
        cells = []
        for c in cols:
            try:
                cells.append(fmt.format(get(results[c])))
            except (KeyError, TypeError):
                cells.append("—")
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = ["| property | measurement | " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * len(cols)]
    add = lambda prop, label, get, fmt="{:.3g}": lines.append(row(f"{prop} | {label}", get, fmt))  # noqa: E731
    add("1. samples are the concept", "exact samples of each of the 36 concepts classified as it",
        lambda r: r["classified_correctly"], "{:.1%}")
    add("", "Laplacian energy of exact samples / renders with the same sensor noise", lambda r: r["edge_energy_vs_renders"])
    for s in ("1.0", "3.0", "7.5"):
        add("2. text tilts" if s == "1.0" else "", f"DDIM adherence, CFG {s}", lambda r, s=s: r["ddim_adherence_by_cfg"][s],
            "{:.2f}")
    add("3. latent-like space", "RMS of exact samples (model units)", lambda r: r["data_rms"])
    for t in ("1", "20", "100", "500"):
        add("", f"RMS eps / RMS noise for a randn x0, t = {t}", lambda r, t=t: r["randn_eps_over_noise"][t])
    for k in ("exact samples", "randn", "blurred samples"):
        add("4. bounded source" if k == "exact samples" else "", f"max log p(y+tgt) - log p(y+src), {k}",
            lambda r, k=k: r["max_log_ratio_tgt_src"][k], "{:.4g}")
    for t in ("300", "500", "600", "700", "800", "900"):
        add("5. generalizes" if t == "300" else "", f"posterior components (exp entropy), t = {t}",
            lambda r, t=t: r["posterior_components_by_t"][t])
    for t in ("300", "500", "700", "900"):
        add("", f"RMS(eps_cond - eps_uncond) on noised samples, t = {t}", lambda r, t=t: r["cfg_gap_rms_by_t"][t])
    add("6. fast", "ms per eps evaluation, batch 16", lambda r: r["ms_per_eval_b16"], "{:.1f}")
    add("", "ms per CFG pair, batch 16", lambda r: r["ms_per_cfg_pair_b16"], "{:.1f}")
    table = "\n".join(lines)
    start, end = "<!-- calibration:start -->", "<!-- calibration:end -->"
    text = readme.read_text() if readme.exists() else ""
    block = (f"{start}\n## Calibration: does the world behave like a latent text-to-image model?\n\n"
             f"`python experiments/exact/calibrate.py` (this machine, CPU); the old column comes from "
             f"`--compare-old c50cb2a`, both columns measured in one run with nothing else on the cores (the cost rows "
             f"compare only within one run).\n\n{table}\n{end}")
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + block + "\n"
    readme.write_text(text)


if __name__ == "__main__":
    main()
