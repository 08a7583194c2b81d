"""Mesh export: the density's level set by marching cubes (scikit-image), albedo as vertex colors, .ply and .obj.

The density is sampled on a ``resolution^3`` grid over the cube ``[-r, r]^3`` (r the scene radius) in chunks; the
surface is the ``threshold`` level set (threestudio's default isosurface threshold is 25 for its density scale; the
default here, 10, suits the blob-initialized fields a short run produces). Vertices get the field's albedo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdbridge.files import atomic_open
from sdbridge.targets.nerf.field import RadianceField


@torch.no_grad()
def extract_mesh(field_: RadianceField, resolution: int = 128, threshold: float = 10.0, chunk: int = 65536):
    """``(vertices (V, 3) float32 world units, faces (F, 3) int64, colors (V, 3) uint8)``.

    Raises ValueError when the level set is empty (an all-empty or all-full field), naming the density range.
    """
    from skimage.measure import marching_cubes

    r = field_.config.radius
    device = field_.encoding.embeddings.device
    axis = torch.linspace(-r, r, resolution, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    density = torch.cat([field_.density(grid[i:i + chunk]) for i in range(0, grid.shape[0], chunk)])
    volume = density.view(resolution, resolution, resolution).float().cpu().numpy()
    lo, hi = float(volume.min()), float(volume.max())
    if not lo < threshold < hi:
        raise ValueError(f"no surface at density {threshold}: the field's density spans [{lo:.3g}, {hi:.3g}]")
    verts, faces, _, _ = marching_cubes(volume, level=threshold, spacing=(2 * r / (resolution - 1),) * 3)
    verts = verts - r
    albedo = []
    vt = torch.from_numpy(verts.copy()).float().to(device)
    for i in range(0, vt.shape[0], chunk):
        albedo.append(field_(vt[i:i + chunk])["albedo"])
    colors = (torch.cat(albedo).clamp(0, 1) * 255).round().byte().cpu().numpy() if albedo else np.zeros((0, 3), np.uint8)
    return verts.astype(np.float32), faces.astype(np.int64), colors


def write_ply(path: Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> Path:
    """Binary little-endian PLY with per-vertex RGB."""
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(verts)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    vertex = np.empty(len(verts), dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])
    vertex["xyz"], vertex["rgb"] = verts, colors
    face = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", 3)])
    face["n"], face["idx"] = 3, faces
    with atomic_open(path) as f:
        f.write(header.encode("ascii"))
        f.write(vertex.tobytes())
        f.write(face.tobytes())
    return Path(path)


def write_obj(path: Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> Path:
    """Wavefront OBJ with the common ``v x y z r g b`` vertex-color extension (colors in [0, 1])."""
    rgb = colors.astype(np.float32) / 255
    with atomic_open(path, "w") as f:
        f.write("# sdbridge NeRF export\n")
        np.savetxt(f, np.hstack([verts, rgb]), fmt="v %.6f %.6f %.6f %.4f %.4f %.4f")
        np.savetxt(f, faces + 1, fmt="f %d %d %d")
    return Path(path)


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read back a PLY written by :func:`write_ply` (for round-trip tests and tools)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    nv = int(next(ln for ln in header if ln.startswith("element vertex")).split()[-1])
    nf = int(next(ln for ln in header if ln.startswith("element face")).split()[-1])
    vertex = np.frombuffer(data, dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)], count=nv, offset=end)
    face = np.frombuffer(data, dtype=[("n", "u1"), ("idx", "<i4", 3)], count=nf, offset=end + vertex.nbytes)
    return vertex["xyz"].copy(), face["idx"].astype(np.int64), vertex["rgb"].copy()
