"""Writing what a person looks at: PNGs, grids and mp4 videos."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sdbridge.files import atomic_open, atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` or ``(3, H, W)`` floats in [0, 1] to ``(N, H, W, 3)`` / ``(H, W, 3)`` uint8."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return arr.movedim(-3, -1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile ``(N, 3, H, W)`` into one ``(3, H', W')`` image with a white border."""
    n, c, h, w = images.shape
    nrow = nrow or min(n, max(1, math.ceil(math.sqrt(n))))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = (
            images[i].detach().cpu()
        )
    return grid


def upsample_to(images: torch.Tensor, min_side: int = 128) -> torch.Tensor:
    """Nearest-neighbour upsampling by an integer factor so each image is at least ``min_side`` pixels: small images
    (the exact prior's 32 x 32) stay crisp and readable."""
    factor = max(1, math.ceil(min_side / images.shape[-1]))
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def comparison_grid(rows: Sequence[torch.Tensor], min_side: int = 128) -> torch.Tensor:
    """One ``(3, H', W')`` image with one row per tensor of ``(N_i, 3, H, W)`` images, upsampled to ``min_side``."""
    width = max(r.shape[0] for r in rows)
    tiles = []
    for row in rows:
        pad = torch.ones(width - row.shape[0], *row.shape[1:], dtype=row.dtype)
        tiles.append(torch.cat([row.detach().cpu(), pad]))
    return make_grid(upsample_to(torch.cat(tiles), min_side), nrow=width, pad=4)


def save_png(image: torch.Tensor, path: Path) -> Path:
    """``image`` (``(3, H, W)`` in [0, 1]) as a PNG, written atomically (:mod:`sdbridge.files`)."""
    import imageio.v3 as iio

    with atomic_open(path) as f:
        iio.imwrite(f, to_uint8(image), extension=".png")
    return Path(path)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """An image file as ``(3, H, W)`` floats in [0, 1], optionally resized (bilinear, antialiased) to size x size."""
    import imageio.v3 as iio

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    arr = np.asarray(iio.imread(path))
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    img = torch.from_numpy(arr[..., :3].copy()).float().movedim(-1, 0) / 255.0
    if size is not None and tuple(img.shape[-2:]) != (size, size):
        img = torch.nn.functional.interpolate(img[None], (size, size), mode="bilinear", antialias=True)[0]
    return img.clamp(0, 1)


def write_video(frames: Sequence[Path] | Sequence[np.ndarray], path: Path, fps: int = 10) -> Path:
    """Encode frames (PNG paths or HxWx3 uint8 arrays) as an H.264 mp4 (imageio-ffmpeg's bundled ffmpeg), written
    atomically (:mod:`sdbridge.files`)."""
    import imageio.v2 as iio2
    import imageio.v3 as iio

    with atomic_path(path) as tmp, iio2.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1, ffmpeg_log_level="error") as w:
        for f in frames:
            arr = iio.imread(f) if isinstance(f, (str, Path)) else f
            h, wd = arr.shape[:2]
            w.append_data(arr[: h - h % 2, : wd - wd % 2, :3])  # libx264 needs even sides
    return Path(path)


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    s = re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_").lower()
    return (s[:max_len].rstrip("_")) or "empty"
