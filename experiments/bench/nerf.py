"""NeRF renderer throughput: rays/s of evaluation renders and ms per training step, at several resolutions.

    python experiments/bench/nerf.py                       # CPU (or the GPU if there is one), 64 and 512
    python experiments/bench/nerf.py --device cuda --samples 512 --resolutions 64 512
    python experiments/bench/nerf.py --readme     # also put the table into experiments/bench/README.md
    python experiments/bench/nerf.py --resolutions 8 16 --samples 4 --repeats 1   # toy scale (gpu.sh --dry-run)

The field is the official 3D one (16 levels x 2 features, 2^19 table, max res 4096, 64-wide MLPs, all levels
unmasked). A **training step** renders one camera at the resolution with the configured samples per ray (stratified,
finite-difference normals off: albedo shading), computes a loss (the mean rendered color: the guidance itself is
not part of this benchmark) and runs backward and an Adam step. An **evaluation render** is no-grad, in chunks.
Each number is the median of ``--repeats`` timed runs after one warm-up. Memory is the peak CUDA allocation on a
GPU and the process's peak RSS growth on CPU. A training step that runs out of GPU memory is reported as such in its
row (the PyTorch hash grid keeps every sample's corner indices for backward: 512x512 renders at 512 samples per ray
need far more than one GPU holds) and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if not __package__:  # run as a script: the repository root makes `experiments` importable
    sys.path.insert(0, str(ROOT))

from experiments.bench.readme import README_PATH_OPTION, command_line, write_block
from sdbridge.targets.nerf.cameras import CameraConfig, camera_rays, turntable_cameras
from sdbridge.targets.nerf.encoding import HashGridConfig, tinycudann_available
from sdbridge.targets.nerf.field import FieldConfig, RadianceField
from sdbridge.targets.nerf.renderer import RendererConfig, Shading, VolumeRenderer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_or_oom(fn, device, repeats: int) -> tuple[float, str]:
    """:func:`timed`, or NaN and ``"out of memory"`` when the GPU cannot hold it (the caches are emptied for the next
    row once the failed step's tensors are gone)."""
    try:
        return timed(fn, device, repeats), ""
    except torch.cuda.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()
    return float("nan"), "out of memory"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--samples", type=int, default=64, help="samples per ray (official: 512)")
    parser.add_argument("--train-max-resolution", type=int, default=512,
                        help="skip training steps above this side (CPU memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--readme", action="store_true", help="write the table into the README (--readme-path)")
    parser.add_argument(README_PATH_OPTION, type=Path, default=ROOT / "experiments" / "bench" / "README.md",
                        help="the README --readme writes (gpu.sh --dry-run: a temporary copy)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    field_ = RadianceField(FieldConfig(encoding=HashGridConfig(start_level=16, start_step=0))).to(device)
    field_.set_step(0)
    renderer = VolumeRenderer(RendererConfig(num_samples=args.samples, chunk=65536), field_).to(device)
    optimizer = torch.optim.Adam(renderer.parameters(), lr=1e-3)
    cams = turntable_cameras(CameraConfig(eval_views=1))
    backend = "tinycudann" if field_.encoding.tcnn is not None else "PyTorch"
    rows = []
    for side in args.resolutions:
        o, d = camera_rays(cams["c2w"].to(device), cams["fovy"].to(device), side, side)
        lights = cams["light_positions"].to(device)[:, None, None].expand(1, side, side, 3)

        def evaluate():
            with torch.no_grad():
                renderer(o, d, lights, Shading.albedo)

        def train():
            out = renderer(o, d, lights, Shading.albedo, generator=torch.Generator().manual_seed(0))
            loss = out["rgb"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        eval_s, eval_note = timed_or_oom(evaluate, device, args.repeats)
        train_s, note = float("nan"), "skipped"
        if side <= args.train_max_resolution:
            optimizer.zero_grad(set_to_none=True)
            train_s, note = timed_or_oom(train, device, args.repeats)
        rays = side * side
        row = (side, _cell(rays / eval_s, eval_note), _cell(train_s * 1000, note), _cell(rays / train_s, note),
               peak_memory_gb(device))
        rows.append(row)
        print(f"{side}x{side}: eval {row[1]} rays/s, training step {row[2]} ms ({row[3]} rays/s), peak memory "
              f"{row[4]:.2f} GB", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    table = [
        f"Device: {name}; torch {torch.__version__}; encoding backend: {backend} (tinycudann importable: "
        f"{tinycudann_available()}); {args.samples} samples per ray; median of {args.repeats} after a warm-up.",
        "",
        "| resolution | eval rays/s | training step (ms) | training rays/s | peak memory (GB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *[f"| {s}x{s} | {e} | {t} | {r} | {m:.2f} |" for s, e, t, r, m in rows],
    ]
    text = "\n".join(table)
    print("\n" + text)
    if args.readme:
        command = command_line("experiments/bench/nerf.py", argv if argv is not None else sys.argv[1:])
        write_block(args.readme_path, f"bench_nerf:{device.type}", f"`{command}`\n\n{text}")


def _cell(value: float, note: str) -> str:
    """A table cell: the number, or why there is none (``skipped``, ``out of memory``)."""
    return note if math.isnan(value) else f"{value:,.0f}"


if __name__ == "__main__":
    main()
