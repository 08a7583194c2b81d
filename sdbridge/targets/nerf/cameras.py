"""Random training cameras, DreamFusion light sampling, turntable evaluation cameras, and rays.

Conventions (threestudio's, so presets carry over): world z is up; a camera at elevation ``e`` and azimuth ``a``
(degrees) at distance ``d`` sits at ``d * (cos e cos a, cos e sin a, sin e)`` and looks at the origin; camera-to-world
matrices are OpenGL-style (the camera looks along its -z axis, +y is up in the image). Azimuth 0 is the "front".

Training batches are a pure function of ``(seed, step)``: each step's cameras are drawn from a generator seeded by
both, so Lightning's prefetching of the next batch and a resume from a checkpoint give exactly the batches an
uninterrupted run sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset


@dataclass
class CameraConfig:
    """Official 3D ranges (threestudio ``sdi.yaml``): distance [1.5, 2.0], fovy [40, 70] deg, elevation [-10, 45]
    deg; DreamFusion light sampling: the light sits near the camera, ``light_distance_range`` [0.8, 1.5] from the
    origin in the direction of the camera perturbed by N(0, ``light_position_perturb``^2)."""

    batch_size: int = 1
    distance_range: list[float] = field(default_factory=lambda: [1.5, 2.0])
    fovy_range: list[float] = field(default_factory=lambda: [40.0, 70.0])
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    azimuth_range: list[float] = field(default_factory=lambda: [-180.0, 180.0])
    light_distance_range: list[float] = field(default_factory=lambda: [0.8, 1.5])
    light_position_perturb: float = 1.0
    eval_distance: float = 1.75
    eval_fovy: float = 55.0
    eval_elevation: float = 15.0
    eval_views: int = 30  # turntable frames (video and exact metrics)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"target.cameras.batch_size={self.batch_size} must be >= 1")
        for key in ("distance_range", "fovy_range", "elevation_range", "azimuth_range", "light_distance_range"):
            lo_hi = list(getattr(self, key))
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ValueError(f"target.cameras.{key}={lo_hi} must be [low, high] with low <= high")
        if self.distance_range[0] <= 0 or not 0 < self.fovy_range[0] <= self.fovy_range[1] < 180:
            raise ValueError("target.cameras: distances must be > 0 and fovy in (0, 180) degrees")
        if not -90 <= self.elevation_range[0] <= self.elevation_range[1] <= 90:
            raise ValueError(f"target.cameras.elevation_range={list(self.elevation_range)} must lie in [-90, 90]")
        if self.eval_views < 1:
            raise ValueError(f"target.cameras.eval_views={self.eval_views} must be >= 1")


def look_at(position: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` camera positions -> ``(B, 4, 4)`` camera-to-world matrices looking at the origin, z up."""
    forward = F.normalize(-position, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = F.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    # straight above or below: any horizontal right vector will do
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        right = torch.where(degenerate[:, None], torch.tensor([0.0, 1.0, 0.0], device=position.device), right)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, -forward, position
    c2w[:, 3, 3] = 1
    return c2w


def spherical_position(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    e, a = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack([distance * e.cos() * a.cos(), distance * e.cos() * a.sin(), distance * e.sin()], dim=-1)


def _uniform(lo_hi: list[float], n: int, generator: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def make_batch(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor, fovy: torch.Tensor,
               light_positions: torch.Tensor) -> dict[str, Any]:
    position = spherical_position(elevation, azimuth, distance)
    return {
        "c2w": look_at(position),
        "fovy": fovy,
        "elevation": elevation,
        "azimuth": azimuth,
        "distance": distance,
        "light_positions": light_positions,
    }


def sample_cameras(config: CameraConfig, generator: torch.Generator) -> dict[str, Any]:
    """A training batch of ``config.batch_size`` random cameras and point lights (CPU tensors)."""
    n = config.batch_size
    elevation = _uniform(config.elevation_range, n, generator)
    azimuth = _uniform(config.azimuth_range, n, generator)
    distance = _uniform(config.distance_range, n, generator)
    fovy = _uniform(config.fovy_range, n, generator)
    position = spherical_position(elevation, azimuth, distance)
    direction = F.normalize(position + config.light_position_perturb * torch.randn(n, 3, generator=generator), dim=-1)
    lights = direction * _uniform(config.light_distance_range, n, generator)[:, None]
    return make_batch(elevation, azimuth, distance, fovy, lights)


def turntable_cameras(config: CameraConfig, views: int | None = None) -> dict[str, Any]:
    """``views`` cameras evenly spaced in azimuth (starting at the front), fixed elevation, distance and fovy;
    the light sits at the camera."""
    n = views or config.eval_views
    azimuth = torch.arange(n, dtype=torch.float32) * 360.0 / n
    azimuth = torch.where(azimuth > 180, azimuth - 360, azimuth)
    elevation = torch.full((n,), config.eval_elevation)
    distance = torch.full((n,), config.eval_distance)
    fovy = torch.full((n,), config.eval_fovy)
    return make_batch(elevation, azimuth, distance, fovy, spherical_position(elevation, azimuth, distance))


def camera_rays(c2w: torch.Tensor, fovy_deg: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinhole rays through pixel centres: origins and unit directions, each ``(B, H, W, 3)``."""
    focal = 0.5 * height / torch.tan(torch.deg2rad(fovy_deg.to(c2w)) / 2)  # (B,)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=c2w.dtype, device=c2w.device) + 0.5,
                            torch.arange(width, dtype=c2w.dtype, device=c2w.device) + 0.5, indexing="ij")
    dirs = torch.stack([(xs - width / 2), -(ys - height / 2), -torch.full_like(xs, 1.0)], dim=-1)  # (H, W, 3)
    dirs = dirs[None] / torch.stack([focal, focal, torch.ones_like(focal)], dim=-1)[:, None, None, :]
    world = F.normalize(torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs), dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(world)
    return origins, world


def step_seed(seed: int, step: int) -> int:
    """A generator seed for ``(run seed, step)`` (SplitMix-style mixing; distinct steps get unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


class CameraStream(IterableDataset):
    """Endless training batches; batch ``i`` of an iterator started at step ``s`` is the batch of step ``s + i``."""

    def __init__(self, config: CameraConfig, seed: int, start_step: int = 0):
        self.config, self.seed, self.start_step = config, seed, start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.start_step
        while True:
            batch = sample_cameras(self.config, torch.Generator().manual_seed(step_seed(self.seed, step)))
            batch["step"] = step
            batch["render_seed"] = step_seed(self.seed + 0x632BE5AB, step)  # sample jitter, shading, background
            yield batch
            step += 1


class CameraDataModule(L.LightningDataModule):
    """Random training cameras; the stream starts at the trainer's step, so a resumed run continues its sequence."""

    def __init__(self, config: CameraConfig, seed: int):
        super().__init__()
        self.config, self.seed = config, seed

    def train_dataloader(self) -> DataLoader:
        start = int(self.trainer.global_step) if self.trainer is not None else 0
        return DataLoader(CameraStream(self.config, self.seed, start), batch_size=None, num_workers=0)


__all__ = ["CameraConfig", "CameraDataModule", "camera_rays", "look_at", "sample_cameras", "turntable_cameras"]
