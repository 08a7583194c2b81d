"""NeRF renderer throughput: rays/s of evaluation renders and ms per training step, at several resolutions.

    python experiments/bench/nerf.py                       # CPU (or the GPU if there is one), 64 and 512
    python experiments/bench/nerf.py --device cuda --samples 512 --resolutions 64 512
    python experiments/bench/nerf.py --readme     # also put the table into experiments/bench/README.md

The field is the official 3D one (16 levels x 2 features, 2^19 table, max res 4096, 64-wide MLPs, all levels
unmasked). A **training step** renders one camera at the resolution with the configured samples per ray (stratified,
finite-difference normals off: albedo shading), computes a loss (the mean rendered color: the guidance itself is
not part of this benchmark) and runs backward and an Adam step. An **evaluation render** is no-grad, in chunks.
Each number is the median of ``--repeats`` timed runs after one warm-up. Memory is the peak CUDA allocation on a
GPU and the process's peak RSS growth on CPU.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

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


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--samples", type=int, default=64, help="samples per ray (official: 512)")
    parser.add_argument("--train-max-resolution", type=int, default=512,
                        help="skip training steps above this side (CPU memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--readme", action="store_true", help="write the table into experiments/bench/README.md")
    args = parser.parse_args()
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
        eval_s = timed(evaluate, device, args.repeats)
        train_s = timed(train, device, args.repeats) if side <= args.train_max_resolution else float("nan")
        rays = side * side
        rows.append((side, rays / eval_s, train_s * 1000, rays / train_s, peak_memory_gb(device)))
        print(f"{side}x{side}: eval {rays / eval_s:,.0f} rays/s, training step {train_s * 1000:,.0f} ms "
              f"({rays / train_s:,.0f} rays/s), peak memory {rows[-1][4]:.2f} GB", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    table = [
        f"Device: {name}; torch {torch.__version__}; encoding backend: {backend} (tinycudann importable: "
        f"{tinycudann_available()}); {args.samples} samples per ray; median of {args.repeats} after a warm-up.",
        "",
        "| resolution | eval rays/s | training step (ms) | training rays/s | peak memory (GB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *[f"| {s}x{s} | {e:,.0f} | {t:,.0f} | {r:,.0f} | {m:.2f} |" for s, e, t, r, m in rows],
    ]
    text = "\n".join(table)
    print("\n" + text)
    if args.readme:
        readme = ROOT / "experiments" / "bench" / "README.md"
        start, end = f"<!-- bench_nerf:{device.type}:start -->", f"<!-- bench_nerf:{device.type}:end -->"
        old = readme.read_text()
        command = "python experiments/bench/nerf.py " + " ".join(sys.argv[1:])
        block = f"{start}\n`{command.strip()}`\n\n{text}\n{end}"
        if start in old:
            new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
        else:
            new = old.rstrip("\n") + "\n\n" + block + "\n"
        readme.write_text(new)


if __name__ == "__main__":
    main()
