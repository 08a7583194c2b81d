"""Volume rendering of a :class:`RadianceField`: ray-sphere bounds, stratified (+ importance) sampling, alpha
compositing, a background, and DreamFusion's random shading.

For a ray with samples ``t_1 < ... < t_N`` in ``[near, far]``, interval ``i`` spans the midpoints between its
neighbours (the first starts at ``near``, the last ends at ``far``), so the intervals tile ``[near, far]`` exactly:
``alpha_i = 1 - exp(-sigma_i delta_i)``, ``T_i = prod_{j<i} (1 - alpha_j)``, ``w_i = T_i alpha_i`` and
``sum_i w_i = 1 - prod_i (1 - alpha_i) <= 1`` — for a constant density sigma this is ``1 - exp(-sigma (far - near))``
whatever the samples. Color = ``sum_i w_i c_i + (1 - sum_i w_i) * background``.

Shading (DreamFusion; threestudio's ``diffuse-with-point-light`` material): ``albedo`` returns the albedo;
``diffuse`` multiplies it by ``ambient + diffuse * max(0, n . l)`` for a point light; ``textureless`` shows the
lighting on a white surface. During training a batch picks one at random each step: albedo for the first
``ambient_only_steps`` steps, then albedo with probability ``1 - diffuse_prob``, else textureless with probability
``textureless_prob``, else diffuse (threestudio's defaults: 1000, 0.75, 0.5).

Rays are evaluated in chunks of ``chunk`` rays, so an evaluation render at 512x512 holds only one chunk's samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdbridge.targets.nerf.field import RadianceField, mlp


class BackgroundKind(Enum):
    envmap = "a small network of the view direction (learned)"
    solid = "a fixed color (background_color)"
    random = "a random solid color per training step; background_color when evaluating"


class Shading(Enum):
    albedo = "albedo only"
    diffuse = "albedo x (ambient + diffuse point light)"
    textureless = "white albedo x (ambient + diffuse point light)"


@dataclass
class ShadingConfig:
    ambient_only_steps: int = 1000
    diffuse_prob: float = 0.75
    textureless_prob: float = 0.5
    ambient: float = 0.1
    diffuse: float = 0.9

    def __post_init__(self) -> None:
        for key in ("diffuse_prob", "textureless_prob", "ambient", "diffuse"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"target.renderer.shading.{key}={getattr(self, key)} must be in [0, 1]")
        if self.ambient_only_steps < 0:
            raise ValueError("target.renderer.shading.ambient_only_steps must be >= 0")


@dataclass
class RendererConfig:
    num_samples: int = 512  # stratified samples per ray (official 3D setting)
    num_importance: int = 0  # extra samples per ray drawn from a no-grad coarse pass's weights (0: off)
    near: float = 0.1  # rays start at least this far from the camera
    chunk: int = 8192  # rays per field evaluation chunk
    background: BackgroundKind = BackgroundKind.envmap
    background_color: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    random_background_prob: float = 0.0  # envmap: chance per training step of a random solid color instead
    # (threestudio's random_aug, 0.5 in its ProlificDreamer config), so the scene cannot hide in the background
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    # evaluation renders (no gradient: validation grids, turntable) skip the normals of each ray's lowest-weight
    # samples whose weights sum to at most this (0: a normal at every sample). A pixel's composited normal or lit
    # color then moves by at most this (1e-3: a quarter of an 8-bit level; the demo's normal grid, renormalized,
    # moved by <= 2 levels on 0.6% of its pixels); on the CPU demo the finite-difference normals of every sample
    # were 87% of the export time (155 -> 39 s, README's NeRF section)
    eval_normal_skip_weight: float = 1e-3

    def __post_init__(self) -> None:
        if not 0 <= self.eval_normal_skip_weight < 1:
            raise ValueError(f"target.renderer.eval_normal_skip_weight={self.eval_normal_skip_weight} must be in [0, 1)")
        if self.num_samples < 2 or self.num_importance < 0:
            raise ValueError("target.renderer.num_samples must be >= 2 and num_importance >= 0")
        if not 0 <= self.random_background_prob <= 1:
            raise ValueError(f"target.renderer.random_background_prob={self.random_background_prob} must be in [0, 1]")
        if self.chunk < 1 or self.near < 0:
            raise ValueError("target.renderer.chunk must be >= 1 and near >= 0")
        if len(self.background_color) != 3 or not all(0 <= c <= 1 for c in self.background_color):
            raise ValueError(f"target.renderer.background_color={list(self.background_color)} must be 3 values in [0, 1]")


def ray_sphere(origins: torch.Tensor, dirs: torch.Tensor, radius: float, near: float = 0.0):
    """Entry and exit distances of unit-direction rays with the origin-centred sphere; ``hit`` is False for rays
    that miss it (their interval is empty, ``near == far``)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius**2
    disc = b * b - c
    hit = disc > 0
    root = disc.clamp_min(0).sqrt()
    t0 = (-b - root).clamp_min(near)
    t1 = (-b + root).clamp_min(near)
    hit = hit & (t1 > t0)
    t1 = torch.where(hit, t1, t0)
    return t0, t1, hit


def stratified_fractions(rows: int, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``(rows, n)`` increasing fractions in [0, 1], one uniform in each of n equal bins (bin centres without a
    generator, for deterministic evaluation renders)."""
    u = torch.full((rows, n), 0.5) if generator is None else torch.rand(rows, n, generator=generator)
    return (torch.arange(n) + u).to(device) / n


def stratified(near: torch.Tensor, far: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(R, n)`` sorted samples, one uniform in each of n equal bins of [near, far]."""
    frac = stratified_fractions(near.shape[0], n, generator, near.device)
    return near[:, None] + (far - near)[:, None] * frac


def interval_edges(t: torch.Tensor, near: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """``(R, N + 1)`` edges of the intervals around the samples: near, the midpoints, far."""
    return torch.cat([near[:, None], (t[:, 1:] + t[:, :-1]) / 2, far[:, None]], dim=1)


def interval_lengths(t: torch.Tensor, near: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """Lengths of the intervals around each sample, tiling [near, far] (see the module docstring)."""
    return interval_edges(t, near, far).diff(dim=1)


def composite_weights(sigma: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``w_i = T_i alpha_i`` for densities and interval lengths ``(R, N)``."""
    alpha = 1 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], dim=1), dim=1)[:, :-1]
    return alpha * trans


def visible_samples(weights: torch.Tensor, skip: float) -> torch.Tensor:
    """``(R, N)`` mask: all but each ray's lowest-weight samples whose weights sum to at most ``skip``."""
    ascending, order = weights.sort(dim=1)
    skipped = ascending.cumsum(1) <= skip
    return ~torch.zeros_like(skipped).scatter(1, order, skipped)


def sample_pdf(t: torch.Tensor, weights: torch.Tensor, near: torch.Tensor, far: torch.Tensor, n: int,
               generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF samples of the piecewise-constant density ``weights`` over the intervals around ``t``."""
    edges = interval_edges(t, near, far)  # (R, N + 1)
    pdf = weights + 1e-5
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(-1)], dim=1).clamp(max=1)
    u = stratified_fractions(t.shape[0], n, generator, t.device)  # stratified in the CDF
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp(1, cdf.shape[1] - 1)
    c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
    e0, e1 = edges.gather(1, idx - 1), edges.gather(1, idx)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-8)).clamp(0, 1)
    return e0 + frac * (e1 - e0)


class EnvironmentMap(nn.Module):
    """Background color from the view direction: Fourier features (4 octaves) -> MLP -> sigmoid."""

    def __init__(self, octaves: int = 4, hidden: int = 32):
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(octaves)) * math.pi, persistent=False)
        self.net = mlp(3 + 6 * octaves, 3, hidden, 1)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        x = dirs[..., None] * self.freqs  # (..., 3, F)
        feats = torch.cat([dirs, x.sin().flatten(-2), x.cos().flatten(-2)], dim=-1)
        return torch.sigmoid(self.net(feats))


def pick_shading(config: ShadingConfig, step: int, generator: torch.Generator) -> Shading:
    u1, u2 = torch.rand(2, generator=generator).tolist()  # always two draws: the stream does not depend on step
    if step < config.ambient_only_steps or u1 > config.diffuse_prob:
        return Shading.albedo
    return Shading.textureless if u2 < config.textureless_prob else Shading.diffuse


class VolumeRenderer(nn.Module):
    def __init__(self, config: RendererConfig, field_: RadianceField):
        super().__init__()
        self.config = config
        self.field = field_
        self.background = EnvironmentMap() if config.background == BackgroundKind.envmap else None
        self.register_buffer("background_color", torch.tensor(list(config.background_color)), persistent=False)

    def shade(self, albedo: torch.Tensor, normals: torch.Tensor | None, points: torch.Tensor,
              light: torch.Tensor, shading: Shading) -> torch.Tensor:
        if shading == Shading.albedo:
            return albedo
        c = self.config.shading
        lambert = (normals * F.normalize(light - points, dim=-1)).sum(-1, keepdim=True).clamp_min(0)
        light_color = c.ambient + c.diffuse * lambert
        return light_color.expand_as(albedo) if shading == Shading.textureless else albedo * light_color

    def background_rgb(self, dirs: torch.Tensor, color: torch.Tensor | None) -> torch.Tensor:
        """The env map's color, or ``color`` (a random solid background this step), or the configured color."""
        if self.background is not None and color is None:
            return self.background(dirs)
        fill = self.background_color if color is None else color
        return fill.to(dirs).expand(*dirs.shape[:-1], 3)

    def render_rays(
        self,
        origins: torch.Tensor,
        dirs: torch.Tensor,
        lights: torch.Tensor,
        shading: Shading,
        generator: torch.Generator | None,
        need_normals: bool,
        background_color: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render ``(R, 3)`` rays (``lights``: each ray's point-light position). Returns per-ray ``rgb (R, 3)``,
        ``opacity (R,)``, ``depth (R,)``, ``z_variance (R,)``, ``normal (R, 3)`` (if computed) and the per-sample
        ``weights (R, N)`` and ``orient (R, N)`` (``max(0, n . d)^2``) the regularizers need."""
        c = self.config
        radius = self.field.config.radius
        near, far, hit = ray_sphere(origins, dirs, radius, c.near)
        t = stratified(near, far, c.num_samples, generator)
        if c.num_importance > 0:
            with torch.no_grad():
                pts = origins[:, None] + dirs[:, None] * t[..., None]
                sigma = self.field.density(pts.reshape(-1, 3)).view(t.shape)
                w = composite_weights(sigma, interval_lengths(t, near, far))
                extra = sample_pdf(t, w, near, far, c.num_importance, generator)
            t, _ = torch.sort(torch.cat([t, extra], dim=1), dim=1)
        R, N = t.shape
        pts = origins[:, None] + dirs[:, None] * t[..., None]  # (R, N, 3)
        need_normals = need_normals or shading != Shading.albedo
        # evaluation: no normals for the samples that cannot show (RendererConfig.eval_normal_skip_weight)
        sparse_normals = need_normals and not torch.is_grad_enabled() and c.eval_normal_skip_weight > 0
        out = self.field(pts.reshape(-1, 3), with_normals=need_normals and not sparse_normals)
        sigma = out["density"].view(R, N) * hit[:, None]
        delta = interval_lengths(t, near, far)
        weights = composite_weights(sigma, delta)
        opacity = weights.sum(-1)
        if sparse_normals:
            visible = visible_samples(weights, c.eval_normal_skip_weight).reshape(-1)
            normals = pts.new_zeros(R * N, 3)
            if visible.any():
                normals[visible] = self.field.normals(pts.reshape(-1, 3)[visible])
            normals = normals.view(R, N, 3)
        else:
            normals = out["normals"].view(R, N, 3) if need_normals else None
        light = lights[:, None, :].expand(R, N, 3)
        color = self.shade(out["albedo"].view(R, N, 3), normals, pts, light, shading)
        rgb = (weights[..., None] * color).sum(1)
        rgb = rgb + (1 - opacity[:, None]) * self.background_rgb(dirs, background_color)
        depth = (weights * t).sum(-1)
        result = {
            "rgb": rgb,
            "opacity": opacity,
            "depth": depth,
            "z_variance": (weights * (t - depth[:, None]) ** 2).sum(-1),
            "weights": weights,
        }
        if normals is not None:
            result["normal"] = (weights[..., None] * normals).sum(1)
            result["orient"] = (normals * dirs[:, None]).sum(-1).clamp_min(0) ** 2
        return result

    def forward(
        self,
        origins: torch.Tensor,
        dirs: torch.Tensor,
        lights: torch.Tensor,
        shading: Shading = Shading.albedo,
        generator: torch.Generator | None = None,
        need_normals: bool = False,
        background_color: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Render rays of any leading shape ``(..., 3)`` in chunks; outputs keep the leading shape."""
        lead = origins.shape[:-1]
        o, d, li = origins.reshape(-1, 3), dirs.reshape(-1, 3), lights.reshape(-1, 3)
        parts: list[dict[str, torch.Tensor]] = []
        for s in range(0, o.shape[0], self.config.chunk):
            sl = slice(s, s + self.config.chunk)
            parts.append(self.render_rays(o[sl], d[sl], li[sl], shading, generator, need_normals, background_color))
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in out.items()}


def with_lights(batch: dict[str, Any], height: int, width: int) -> torch.Tensor:
    """Each pixel's point-light position ``(B, H, W, 3)`` from the batch's per-camera lights."""
    lights = batch["light_positions"]
    return lights[:, None, None, :].expand(lights.shape[0], height, width, 3)
