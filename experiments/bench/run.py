"""Cost of a guidance step against the cost of its denoiser calls, for every method, measured side by side.

For each prior, method and batch size B (captions optimized at once) it runs the real training loop
(``sdbridge.runner.run``: Lightning, render -> guidance -> backward -> AdamW, VSD's LoRA step) and reports

* ms per iteration (median over the timed steps, after warm-up steps),
* NFEs per iteration (denoiser evaluations per sample, as counted by the prior),
* the denoiser time: one conditioning of the UNet on B latents, timed in the same process right before,
* the **overhead ratio** = ms per iteration / (NFEs x denoiser ms): 1.0 means the step costs only its UNet calls,
* peak memory (CUDA max allocated; on a CPU the process's peak RSS so far, which only grows),
* images per hour for the 2D protocol (1000 steps per image): 3600 * B / (1000 * s per iteration).

A second table (``--variants``) times the speed options of the SD prior (channels-last, attention kernel,
torch.compile, dtype) for one method against the plain path in the same run.

    python experiments/bench/run.py --quick                      # tiny SD on the CPU, < 1 min, the CI smoke run
    python experiments/bench/run.py --prior sd21_base_random --batch-sizes 1 8 --variants --readme   # on a GPU
    python experiments/bench/run.py --prior sd21_base_random --latent-size 24 --methods sds nfsd csd bridge \
        --batch-sizes 1 --readme                                 # SD 2.1 base at a reduced latent size, on a CPU

``--readme`` writes the tables between markers in experiments/bench/README.md (one block per device, prior and
latent size; ``--readme-path`` writes another copy instead). The method rows are written as soon as they are
measured and the speed options added after them, so a run stopped during the speed options keeps its method rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
if not __package__:  # run as a script: the repository root makes `experiments` importable
    sys.path.insert(0, str(ROOT))

import lightning as L
import torch

from experiments.bench.readme import README_PATH_OPTION, block_key, command_line, write_block

ALL_METHODS = ["sds", "nfsd", "csd", "bridge", "sdi", "ism", "vsd", "vsd_full_bridge"]  # VSD last: adapters stay
PROMPTS = ["a photo of a dog", "a red car on a street", "a bowl of fruit", "a wooden chair", "a cozy cabin",
           "a bulldog", "a toucan", "a pineapple"]


class StepTimer(L.Callback):
    """Wall-clock of each training step (CUDA synchronized)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._t0)


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def denoiser_ms(prior, batch: int, repeats: int, conditionings: int = 1) -> float:
    """Median ms of one denoiser call on ``batch`` latents: with one conditioning, the unit an NFE counts; with two,
    a CFG pair (one UNet call on ``2 * batch`` latents)."""
    sync = _sync(prior.device)
    emb = prior.encode_text(PROMPTS[:1] * batch)
    x = torch.randn(batch, *prior.sample_shape, device=prior.device)
    t = torch.full((batch,), 500, device=prior.device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            sync()
            t0 = time.perf_counter()
            prior.predict_eps(x, t, [emb] * conditionings)
            sync()
            if i >= 2:  # two warm-up calls
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def overrides_for(prior_name: str, method: str, batch: int, steps: int, extra: list[str]) -> list[str]:
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    return [f"prior={prior_name}", f"guidance={method}", f"prompt.texts=[{','.join(prompts)}]", "prompt.repeat=1",
            f"trainer.max_steps={steps}", "trainer.checkpoint_every=0", "trainer.save_every=0", "logger=none",
            "trainer.progress_bar=false", "eval.exact=false", *extra]


def time_method(prior, prior_name: str, method: str, batch: int, warmup: int, iters: int, extra: list[str]) -> dict:
    """One real run of ``warmup + iters`` steps; returns the timed medians."""
    from sdbridge.runner import run
    from sdbridge.eval.protocol import compose_run_config

    config, _ = compose_run_config(overrides_for(prior_name, method, batch, warmup + iters, extra))
    timer = StepTimer(_sync(prior.device))
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(config, Path(tmp), callbacks=[timer], prior=prior)
    unet = getattr(prior, "unet", None)
    if unet is not None and getattr(unet, "peft_config", None):  # VSD's adapters: gone before the next method
        unet.delete_adapters(list(unet.peft_config))
    step_s = statistics.median(timer.times[warmup:])
    return {"ms_per_iter": 1000 * step_s, "nfe_per_iter": summary["nfe_per_step"],
            "peak_memory_mb": summary["peak_memory_mb"], "images_per_hour": 3600 * batch / (1000 * step_s)}


def print_row(row: dict) -> None:
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def build_bench_prior(prior_name: str, prior_overrides: list[str]):
    from sdbridge.eval.protocol import compose_run_config
    from sdbridge.priors import build_prior

    config, _ = compose_run_config([f"prior={prior_name}", *prior_overrides])
    return build_prior(config.prior)


def bench_methods(prior_name: str, prior_overrides: list[str], methods: list[str], batches: list[int], warmup: int,
                  iters: int) -> list[dict]:
    prior = build_bench_prior(prior_name, prior_overrides)
    rows = []
    for batch in batches:
        unit = denoiser_ms(prior, batch, repeats=max(3, iters))
        cfg = denoiser_ms(prior, batch, repeats=max(3, iters), conditionings=2)
        for method in methods:
            r = time_method(prior, prior_name, method, batch, warmup, iters, prior_overrides)
            r.update(prior=prior_name, method=method, batch=batch, denoiser_ms=unit, cfg_call_ms=cfg,
                     overhead=r["ms_per_iter"] / (r["nfe_per_iter"] * unit))
            rows.append(r)
            print_row(r)
    return rows


VARIANTS = {  # name -> prior overrides (all on top of the prior's defaults)
    "plain": [],
    "channels_last": ["prior.channels_last=true"],
    "classic attention": ["prior.attention=classic"],
    "bfloat16": ["prior.dtype=bfloat16"],
    "torch.compile": ["prior.compile=true"],
}


def bench_variants(prior_name: str, prior_overrides: list[str], method: str, batch: int, warmup: int, iters: int,
                   names: list[str]) -> list[dict]:
    """The step time of ``method`` with each speed option (a prior of its own each; no separate denoiser timing, so
    torch.compile compiles only the step's shapes)."""
    rows = []
    for name in names:
        extra = [*prior_overrides, *VARIANTS[name]]
        w = warmup + (3 if "compile" in name else 0)  # compilation happens in the first steps
        prior = build_bench_prior(prior_name, extra)
        r = time_method(prior, prior_name, method, batch, w, iters, extra)
        r.update(prior=prior_name, method=method, batch=batch, variant=name)
        rows.append(r)
        print_row(r)
        del prior
    plain = rows[0]["ms_per_iter"]
    for r in rows:
        r["speedup"] = plain / r["ms_per_iter"]
    return rows


def device_line() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads); torch {torch.__version__}"


def method_table(rows: list[dict]) -> str:
    head = ("| prior | method | batch | ms / iter | NFEs / iter | denoiser ms (1 NFE) | overhead ratio | peak memory (GB) "
            "| images / hour |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['prior']} | {r['method']} | {r['batch']} | {r['ms_per_iter']:,.1f} | {r['nfe_per_iter']:.2f} "
                     f"| {r['denoiser_ms']:,.2f} | {r['overhead']:.2f} | {r['peak_memory_mb'] / 1024:.2f} "
                     f"| {r['images_per_hour']:,.1f} |")
    return "\n".join(lines)


def unit_line(rows: list[dict]) -> str:
    """The denoiser units the ratios divide by, per batch: one conditioning, and a CFG pair in one call."""
    units = {r["batch"]: (r["denoiser_ms"], r["cfg_call_ms"]) for r in rows}
    return "Denoiser call, same process: " + "; ".join(
        f"batch {b}: 1 conditioning {one:,.2f} ms, a CFG pair (2 conditionings, one call) {two:,.2f} ms"
        for b, (one, two) in units.items()) + "."


def best_batch_table(rows: list[dict]) -> str:
    lines = ["| prior | method | images / hour at batch 1 | best batch | images / hour at best batch |",
             "|---|---|---:|---:|---:|"]
    for prior, method in dict.fromkeys((r["prior"], r["method"]) for r in rows):
        mine = [r for r in rows if r["prior"] == prior and r["method"] == method]
        one = next((r["images_per_hour"] for r in mine if r["batch"] == 1), float("nan"))
        best = max(mine, key=lambda r: r["images_per_hour"])
        lines.append(f"| {prior} | {method} | {one:,.1f} | {best['batch']} | {best['images_per_hour']:,.1f} |")
    return "\n".join(lines)


def variant_table(rows: list[dict]) -> str:
    lines = ["| variant | method | batch | ms / iter | speed-up vs plain | peak memory (GB) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['method']} | {r['batch']} | {r['ms_per_iter']:,.1f} | {r['speedup']:.2f}x "
                     f"| {r['peak_memory_mb'] / 1024:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny SD, batch 1 and 4, 1 warm-up + 2 timed steps")
    parser.add_argument("--prior", default="tiny_sd", help="tiny_sd (CPU) or sd21_base_random (GPU)")
    parser.add_argument("--latent-size", type=int, default=None,
                        help="prior.latent_size: the latent side the UNet is served at (sd21_base_random: 64 = 512px; "
                             "24 makes one CFG call ~1 s on 2 CPU cores)")
    parser.add_argument("--methods", nargs="*", default=ALL_METHODS)
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--variants", nargs="*", default=None, help=f"speed options to compare: {list(VARIANTS)} "
                        "(no value: all; run with --variant-method at batch 1)")
    parser.add_argument("--variant-method", default="sds")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--readme", action="store_true", help="write the tables into the README (--readme-path)")
    parser.add_argument(README_PATH_OPTION, type=Path, default=Path(__file__).with_name("README.md"),
                        help="the README --readme writes (gpu.sh --dry-run: a temporary copy)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.warmup, args.iters = [1, 4], 1, 2
    unknown = [v for v in args.variants or [] if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {unknown} are not among {list(VARIANTS)}")
    command = command_line("experiments/bench/run.py", argv if argv is not None else sys.argv[1:])
    prior_overrides = [] if args.latent_size is None else [f"prior.latent_size={args.latent_size}"]
    scale = "" if args.latent_size is None else f", latents 4x{args.latent_size}x{args.latent_size}"
    key = block_key("cuda" if torch.cuda.is_available() else "cpu", args.prior, args.latent_size, args.quick)
    start = time.perf_counter()

    def publish(text: str, rows: list[dict], variants: list[dict]) -> None:
        if args.out:
            args.out.write_text(json.dumps({"rows": rows, "variants": variants, "device": device_line()}, indent=1))
        if args.readme:
            write_block(args.readme_path, f"bench:{key}", text)

    rows = bench_methods(args.prior, prior_overrides, args.methods, args.batch_sizes, args.warmup, args.iters)
    text = (f"`{command}`\n\nDevice: {device_line()}; prior `{args.prior}`{scale}; median of {args.iters} steps "
            f"after {args.warmup} warm-up steps. {unit_line(rows)}\n\n{method_table(rows)}\n\n{best_batch_table(rows)}")
    publish(text, rows, [])
    variants: list[dict] = []
    if args.variants is not None:
        names = ["plain", *[v for v in (args.variants or list(VARIANTS)) if v != "plain"]]
        variants = bench_variants(args.prior, prior_overrides, args.variant_method, 1, args.warmup, args.iters, names)
        text += f"\n\nSpeed options, `{args.variant_method}` at batch 1, same run:\n\n{variant_table(variants)}"
        publish(text, rows, variants)
    print("\n" + text)
    print(f"\n(bench: {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
