"""The procedural image world behind the exact prior: 6 shapes x 6 colors, one sharp shape per image.

An image is one shape of one color on a dark background, at a random position, size and rotation, anti-aliased
over ``ANTIALIAS_PX`` pixels. In pixel units ([-1, 1]) an image of color c with coverage mask ``m`` (values in
[0, 1], one per pixel) is

    x = b 1 + d_c (x) m,          b = background level (per channel),  d_c = color_c - b  (3 channels)

so the color and the geometry factor: every concept of one shape shares that shape's geometry model.

**Geometry model.** For each shape, ``renders_per_cluster * clusters`` random masks are rendered and split by
k-means (pixel space) into ``clusters`` groups of similar position, size and rotation; each group is fitted by a
low-rank Gaussian ``N(mu_g, V_g diag(lam_g) V_g^T)`` (mean and top-``rank`` principal directions of its masks).
A concept component (shape cluster g, color c) is then the Gaussian of ``b 1 + d_c (x) m`` with ``m`` from cluster g,
plus isotropic sensor noise: a mixture of factor analyzers along the rendering manifold. Each component carries
continuous local variation (shifts, scalings, rotations of its group), so exact samples are new images, not stored
renderings, and the posterior at moderate noise spreads over neighbouring components instead of locking onto one.

**Translation-equivariant option** (``templates`` > 0, off by default): instead of clusters over all positions, each
shape gets ``templates`` clusters of *centred* renders (sub-pixel offsets within half a pixel, every size and
rotation), each replicated at every integer shift within the position range (``torch.roll``; the shapes stay inside
the image, so nothing wraps). The component an image's posterior settles on is then always within a pixel of the
image's own position; with clusters over positions it can sit a few pixels away, and SDS-like averages of such
components over noise draws superpose shifted edges into rings (measured, experiments/exact/README.md).

A second, coarser model of each shape (``coarse_clusters`` groups) is what corrupted copies are made of (modifier
words, ``sdbridge/priors/vocabulary.py``): corruption removes detail anyway, and it keeps text-defined sources cheap.

The world is deterministic given its spec and cached on disk (``~/.cache/sdbridge/world``), written atomically with
its size and SHA-256 next to it; a cache file that does not match them is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdbridge.files import atomic_open
from sdbridge.priors import cache

#: Round 1 had "stripes" in place of "star": a stripe pattern's phase varies nonlinearly, so its cluster means were
#: uniform half-intensity squares that explained any blurry blob (measured: SDS and Bridge outputs turned into stripes).
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star")
#: RGB in [0, 1].
COLORS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.78, 0.22),
    "blue": (0.12, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.60, 0.20, 0.80),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = 0.08  # dark gray, [0, 1] units
#: Render ranges in image coordinates ([-1, 1] across the image): centre offset, circumradius, stroke / size.
POSITION_RANGE = 0.2
RADIUS_RANGE = (0.35, 0.55)
ROTATION_RANGE = math.radians(15)  # +- around upright: photographed objects have a canonical orientation, and
#: rotation-averaged cluster means were blurry discs that absorbed blurry optimization states (measured: SDS and
#: Bridge outputs turned into stars and crosses with full-circle rotations)
THICKNESS_RATIO = 0.25  # ring and cross strokes are this fraction of the shape's radius
ANTIALIAS_PX = 1.25
#: Share of ``WorldSpec.clusters`` each shape gets: circles and rings vary in 3 parameters (no visible rotation),
#: the others in 4.
CLUSTER_SHARE = {"circle": 0.75, "square": 1.1, "triangle": 1.1, "ring": 0.75, "cross": 1.1, "star": 1.2}
WORLD_VERSION = 2


def color_vectors() -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, d)`` in pixel units [-1, 1]: background level (3,) and color - background (6, 3), float64."""
    b = torch.full((3,), 2 * BACKGROUND - 1, dtype=torch.float64)
    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float64)
    return b, (2 * rgb - 1) - b


@dataclass(frozen=True)
class WorldSpec:
    size: int = 32
    clusters: int = 64  # geometry components per shape on average (CLUSTER_SHARE splits them)
    rank: int = 12  # principal directions per component
    coarse_clusters: int = 16  # components per shape of the model corrupted copies are made of
    coarse_rank: int = 8
    renders_per_cluster: int = 80
    templates: int = 0  # > 0: translation-equivariant fine model, templates per shape on average (module docstring)
    seed: int = 0

    def key(self) -> str:
        render = {"shapes": SHAPES, "colors": COLORS, "background": BACKGROUND, "position": POSITION_RANGE,
                  "radius": RADIUS_RANGE, "rotation": ROTATION_RANGE, "thickness": THICKNESS_RATIO, "antialias": ANTIALIAS_PX,
                  "share": CLUSTER_SHARE}
        spec = asdict(self)
        if not self.templates:  # the clustered world's key from before the option existed: its caches stay valid
            del spec["templates"]
        blob = json.dumps({**spec, "version": WORLD_VERSION, "render": render}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def check(self) -> None:
        if not 16 <= self.size <= 64:
            raise ValueError(f"prior.size={self.size} must be between 16 and 64")
        for name in ("clusters", "rank", "coarse_clusters", "coarse_rank", "renders_per_cluster"):
            if getattr(self, name) < 1:
                raise ValueError(f"prior.{name}={getattr(self, name)} must be >= 1")
        if self.templates < 0:
            raise ValueError(f"prior.templates={self.templates} must be >= 0 (0: clusters over positions)")

    @property
    def max_shift(self) -> int:
        """K: the translation-equivariant model's integer shifts span [-K, K]^2 pixels (POSITION_RANGE in pixels)."""
        return max(1, round(POSITION_RANGE * self.size / 2))


@dataclass
class GeometryModel:
    """Low-rank Gaussians of coverage masks, all shapes stacked: G = len(SHAPES) * clusters components.

    ``mu`` (G, P) with P = size^2 pixels, ``V`` (G, P, r) orthonormal columns, ``lam`` (G, r) >= 0, ``log_w`` (G,)
    the log share of the shape's renders in each component (sums to 0 per shape after exp), ``shape`` (G,) the
    shape index of each component.
    """

    mu: torch.Tensor
    V: torch.Tensor
    lam: torch.Tensor
    log_w: torch.Tensor
    shape: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mu": self.mu, "V": self.V, "lam": self.lam, "log_w": self.log_w, "shape": self.shape}


@dataclass
class World:
    spec: WorldSpec
    fine: GeometryModel
    coarse: GeometryModel


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = torch.cos(angle), torch.sin(angle)
    return c * x + s * y, -s * x + c * y


def _box_sdf(x: torch.Tensor, y: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    qx, qy = x.abs() - hx, y.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def shape_sdf(shape: str, x: torch.Tensor, y: torch.Tensor, size: torch.Tensor, thick: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of a shape centred at the origin, in the shape's rotated frame."""
    if shape == "circle":
        return torch.sqrt(x**2 + y**2) - size
    if shape == "square":
        return _box_sdf(x, y, 0.8 * size, 0.8 * size)
    if shape == "triangle":  # equilateral, circumradius `size`
        k = math.sqrt(3.0)
        r = size * 0.5
        px, py = x.abs() - r * k, y + r
        fold = px + k * py > 0
        px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
        px = px - torch.minimum(torch.maximum(px, -2 * r * k), torch.zeros_like(px))
        return -torch.sqrt(px**2 + py**2) * torch.sign(py)
    if shape == "ring":
        return (torch.sqrt(x**2 + y**2) - size).abs() - thick / 2
    if shape == "cross":
        return torch.minimum(_box_sdf(x, y, size, thick / 2), _box_sdf(x, y, thick / 2, size))
    if shape == "star":  # five points at radius `size`, inner vertices at 0.45 size (polygon distance by folding)
        k1x, k1y = 0.809016994375, -0.587785252292  # (cos 36 deg, -sin 36 deg)
        px, py = x.abs(), -y
        for kx in (k1x, -k1x):
            dot = (kx * px + k1y * py).clamp(min=0)
            px, py = px - 2 * dot * kx, py - 2 * dot * k1y
        px = px.abs()
        py = py - size
        inner = 0.45
        bax, bay = inner * -k1y, inner * k1x - 1  # ba = inner * (-k1.y, k1.x) - (0, 1)
        h = ((px * bax + py * bay) / (bax**2 + bay**2)).clamp(min=0) * 1
        h = torch.minimum(h, size)
        return torch.sqrt((px - bax * h) ** 2 + (py - bay * h) ** 2) * torch.sign(py * bax - px * bay)
    raise ValueError(f"unknown shape {shape!r}; shapes are {list(SHAPES)}")


def render_masks(shape: str, n: int, size: int, generator: torch.Generator, centred: bool = False) -> torch.Tensor:
    """``n`` random coverage masks of ``shape``, ``(n, size * size)`` float64 in [0, 1]; ``centred``: the centre
    within half a pixel of the image's (the translation-equivariant model's templates)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=generator, dtype=torch.float64)  # noqa: E731
    reach = 1 / size if centred else POSITION_RANGE  # half a pixel is 1 / size in image coordinates
    cx, cy = u(-reach, reach), u(-reach, reach)
    radius, angle = u(*RADIUS_RANGE), u(-ROTATION_RANGE, ROTATION_RANGE)
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    x, y = _rotate(gx - cx, gy - cy, angle)
    sdf = shape_sdf(shape, x, y, radius, THICKNESS_RATIO * radius)
    return (0.5 - sdf * size / (2 * ANTIALIAS_PX)).clamp(0, 1).reshape(n, -1)


def masks_to_images(masks: torch.Tensor, color: str | int, size: int) -> torch.Tensor:
    """Masks ``(n, P)`` of one color to images ``(n, 3, size, size)`` in pixel units [-1, 1]."""
    b, d = color_vectors()
    c = list(COLORS).index(color) if isinstance(color, str) else color
    img = b.view(1, 3, 1) + d[c].view(1, 3, 1) * masks.unsqueeze(1).double()
    return img.reshape(-1, 3, size, size)


def render_shapes(shape: str, color: str, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random renders of (shape, color), ``(n, 3, size, size)`` float32 in pixel units [-1, 1]."""
    return masks_to_images(render_masks(shape, n, size, generator), color, size).float()


def kmeans(X: torch.Tensor, k: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Lloyd's k-means from k distinct random rows; returns the label of each row. Distances in float32 (they only
    rank centres); an emptied cluster is re-seeded with the row farthest from its centre."""
    X32 = X.float()
    x2 = (X32**2).sum(1, keepdim=True)
    centres = X32[torch.randperm(X.shape[0], generator=generator)[:k]].clone()
    labels = torch.zeros(X.shape[0], dtype=torch.long)
    for _ in range(iters):
        dist = x2 - 2 * X32 @ centres.T + (centres**2).sum(1).unsqueeze(0)
        best, labels = dist.min(1)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, X32)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(best.argmax())
            best[far] = -math.inf
            counts[labels[far]] -= 1
            sums[labels[far]] -= X32[far]
            labels[far] = j
            counts[j] = 1
            sums[j] = X32[far]
        centres = sums / counts.clamp(min=1).unsqueeze(1)
    return labels


def clusters_per_shape(clusters: int) -> list[int]:
    return [max(1, round(clusters * CLUSTER_SHARE[shape])) for shape in SHAPES]


def fit_geometry(per_shape: list[torch.Tensor], clusters: list[int], rank: int, generator: torch.Generator
                 ) -> GeometryModel:
    """k-means each shape's masks into ``clusters[shape]`` groups and fit a rank-``rank`` Gaussian to each group."""
    mus, Vs, lams, log_ws, shapes = [], [], [], [], []
    for s, masks in enumerate(per_shape):
        labels = kmeans(masks, clusters[s], generator)
        for j in range(clusters[s]):
            X = masks[labels == j]
            mu = X.mean(0)
            V = torch.zeros(X.shape[1], rank, dtype=torch.float64)
            lam = torch.zeros(rank, dtype=torch.float64)
            if X.shape[0] > 1:
                _, sv, vh = torch.linalg.svd((X - mu) / math.sqrt(X.shape[0] - 1), full_matrices=False)
                q = min(rank, vh.shape[0])
                V[:, :q], lam[:q] = vh[:q].T, sv[:q] ** 2
            mus.append(mu)
            Vs.append(V)
            lams.append(lam)
            log_ws.append(math.log(X.shape[0] / masks.shape[0]))
            shapes.append(s)
    return GeometryModel(torch.stack(mus), torch.stack(Vs), torch.stack(lams),
                         torch.tensor(log_ws, dtype=torch.float64), torch.tensor(shapes))


def shifted(model: GeometryModel, size: int, reach: int) -> GeometryModel:
    """Every component of ``model`` at every integer shift in [-reach, reach]^2 (``torch.roll`` of its mean and basis),
    each with 1 / (2 reach + 1)^2 of its weight; shift-major order."""
    G, P, r = model.V.shape
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    roll = lambda v, dy, dx: v.view(G, size, size, -1).roll((dy, dx), (1, 2)).reshape(v.shape)  # noqa: E731
    return GeometryModel(torch.cat([roll(model.mu, dy, dx) for dy, dx in shifts]),
                         torch.cat([roll(model.V, dy, dx) for dy, dx in shifts]),
                         model.lam.repeat(len(shifts), 1), model.log_w.repeat(len(shifts)) - math.log(len(shifts)),
                         model.shape.repeat(len(shifts)))


def build_world(spec: WorldSpec) -> World:
    spec.check()
    gen = torch.Generator().manual_seed(spec.seed)
    masks = [render_masks(shape, k * spec.renders_per_cluster, spec.size, gen)
             for shape, k in zip(SHAPES, clusters_per_shape(spec.clusters))]
    fine = None if spec.templates else fit_geometry(masks, clusters_per_shape(spec.clusters), spec.rank, gen)
    coarse = fit_geometry(masks, clusters_per_shape(spec.coarse_clusters), spec.coarse_rank, gen)
    if spec.templates:
        per_shape = clusters_per_shape(spec.templates)
        centred = [render_masks(shape, k * spec.renders_per_cluster, spec.size, gen, centred=True)
                   for shape, k in zip(SHAPES, per_shape)]
        fine = shifted(fit_geometry(centred, per_shape, spec.rank, gen), spec.size, spec.max_shift)
    return World(spec, fine, coarse)


def load_world(spec: WorldSpec, cache_dir: str | os.PathLike = "~/.cache/sdbridge/world") -> World:
    """The world for ``spec``: read from the cache, or built (seconds) and cached atomically.

    The cache file is loaded only when its size and SHA-256 match the ones recorded next to it when it was written
    (``world-<key>.pt.sha256.json``, :mod:`sdbridge.priors.cache`); a truncated or garbled file is rebuilt with a
    one-line warning, and a file from before checksums were recorded is rebuilt once."""
    folder = Path(os.path.expanduser(str(cache_dir)))
    path = folder / f"world-{spec.key()}.pt"
    if path.is_file():
        problem = cache.verify_file(path)
        if problem is None:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                return World(spec, GeometryModel(**data["fine"]), GeometryModel(**data["coarse"]))
            except Exception as err:  # matches its checksum yet unreadable: a foreign file
                problem = f"{type(err).__name__} on load"
        cache.warn_rebuild("exact-world", path, problem, recorded=cache.sidecar(path).is_file())
    world = build_world(spec)
    with atomic_open(path) as f:
        torch.save({"fine": world.fine.tensors(), "coarse": world.coarse.tensors()}, f)
    cache.write_sidecar(path)
    return world
