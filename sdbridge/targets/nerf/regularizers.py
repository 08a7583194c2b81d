"""NeRF regularizers and their weight schedules.

A weight is written in config as ``[value]`` (constant) or ``[start_step, start_value, end_value, end_step]``
(threestudio's convention: ``start_value`` until ``start_step``, linear to ``end_value`` at ``end_step``, constant
after). The official SDI preset, e.g., ramps sparsity ``[0, 0.15, 0, 3000]``; Bridge 3D steps the opacity entropy
weight to 1000 at step 10,000 with ``[10000, 0, 1000, 10001]``.

The losses (threestudio's formulas):

* ``sparsity``: ``mean sqrt(opacity^2 + 0.01)`` over rays — empties space that is not needed;
* ``opaque``: the binary entropy of each ray's opacity — pushes every ray to fully opaque or fully empty;
* ``orient``: ``sum w_i max(0, n_i . d)^2 / #(rays with opacity > 0)`` with the weights detached — penalizes
  normals that face away from the camera (DreamFusion's orientation loss);
* ``z_variance``: the weighted variance of the sample depths along each ray, over rays with opacity > 0.5 —
  concentrates each opaque ray's mass at one surface;
* ``convexity``: SDI's "naive convexity loss" (threestudio-based SDI system, ``lambda_convex``, 1 -> 0.1 over 4000
  steps in its 3D preset): the composited normal map, mapped to [0, 1] and multiplied by the opacity as threestudio's
  ``comp_normal``, is downscaled bilinearly to ``convexity_res`` x ``convexity_res`` (8); the loss is minus the mean
  z-component of the cross products of horizontally (left x right) and vertically (down x up) adjacent normals.
  A heuristic, reproduced as the SDI code computes it (world-space normals after the [0, 1] mapping: a normal map
  and its inside-out negation can score the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

import torch
import torch.nn.functional as F


def schedule_value(spec: list[float], step: int) -> float:
    if len(spec) == 1:
        return float(spec[0])
    start_step, start_value, end_value, end_step = spec
    if step <= start_step:
        return float(start_value)
    if step >= end_step:
        return float(end_value)
    return float(start_value + (end_value - start_value) * (step - start_step) / (end_step - start_step))


def _check(name: str, spec: list[float]) -> None:
    spec = list(spec)
    if len(spec) not in (1, 4):
        raise ValueError(
            f"target.regularizers.{name}={spec}: write [value] or [start_step, start_value, end_value, end_step]"
        )
    if len(spec) == 4 and not spec[3] > spec[0]:
        raise ValueError(f"target.regularizers.{name}={spec}: end_step must be > start_step")


@dataclass
class RegularizerConfig:
    sparsity: list[float] = field(default_factory=lambda: [0.0])
    opaque: list[float] = field(default_factory=lambda: [0.0])
    orient: list[float] = field(default_factory=lambda: [0.0])
    z_variance: list[float] = field(default_factory=lambda: [0.0])
    convexity: list[float] = field(default_factory=lambda: [0.0])
    convexity_res: int = 8  # side of the downscaled normal map of the convexity loss (SDI's convexity_res)

    def __post_init__(self) -> None:
        for name in REGULARIZERS:
            _check(name, getattr(self, name))
        if self.convexity_res < 2:
            raise ValueError(f"target.regularizers.convexity_res={self.convexity_res} must be >= 2")

    def weights(self, step: int) -> dict[str, float]:
        return {name: schedule_value(list(getattr(self, name)), step) for name in REGULARIZERS}

    def needs_normals(self) -> bool:
        return any(v != 0 for v in [*self.orient, *self.convexity])


REGULARIZERS = ("sparsity", "opaque", "orient", "z_variance", "convexity")


def normal_colors(normal: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Composited normals ``(..., 3)`` as colors in [0, 1], faded by the opacity ``(...)`` (threestudio's
    ``comp_normal``; validation images add white where the ray is empty)."""
    return (F.normalize(normal, dim=-1) + 1) / 2 * opacity[..., None]


def convexity_loss(normal: torch.Tensor, opacity: torch.Tensor, res: int) -> torch.Tensor:
    """SDI's naive convexity loss of composited normals ``(B, H, W, 3)`` and opacities ``(B, H, W)``."""
    shown = normal_colors(normal, opacity)
    small = F.interpolate(shown.permute(0, 3, 1, 2), (res, res), mode="bilinear", align_corners=False)
    small = small.permute(0, 2, 3, 1)
    horizontal = torch.linalg.cross(small[:, :, :-1], small[:, :, 1:], dim=-1)[..., 2]  # left x right
    vertical = torch.linalg.cross(small[:, 1:], small[:, :-1], dim=-1)[..., 2]  # down x up
    return -(horizontal.mean() + vertical.mean())


def regularizer_losses(render: dict[str, torch.Tensor], convexity_res: int = 8,
                       names: Collection[str] = REGULARIZERS) -> dict[str, torch.Tensor]:
    """Unweighted losses ``names`` from a training render ``(B, H, W, ...)`` (see the module docstring); the
    normal-based ones only when the render has normals."""
    opacity = render["opacity"].flatten()
    losses = {}
    if "sparsity" in names:
        losses["sparsity"] = (opacity**2 + 0.01).sqrt().mean()
    if "opaque" in names:
        o = opacity.clamp(1e-4, 1 - 1e-4)
        losses["opaque"] = -(o * o.log() + (1 - o) * (1 - o).log()).mean()
    if "orient" in names and "orient" in render:
        w = render["weights"].detach().reshape(-1, render["weights"].shape[-1])
        orient = render["orient"].reshape(w.shape)
        losses["orient"] = (w * orient).sum() / (opacity > 0).sum().clamp_min(1)
    if "z_variance" in names:
        zvar = render["z_variance"].flatten()
        mask = opacity > 0.5
        losses["z_variance"] = zvar[mask].mean() if bool(mask.any()) else zvar.sum() * 0
    if "convexity" in names and "normal" in render and render["normal"].dim() == 4:
        losses["convexity"] = convexity_loss(render["normal"], render["opacity"], convexity_res)
    return losses
