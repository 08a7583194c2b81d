"""Optimized targets. ``TARGETS`` maps each target's config dataclass to its class."""

from __future__ import annotations

from sdbridge.targets.base import OptimizerConfig, Render, Target, TargetConfig
from sdbridge.targets.image import ImageTarget, ImageTargetConfig
from sdbridge.targets.nerf.target import NeRFTarget, NeRFTargetConfig

TARGETS: dict[type[TargetConfig], type[Target]] = {ImageTargetConfig: ImageTarget, NeRFTargetConfig: NeRFTarget}

__all__ = ["TARGETS", "ImageTarget", "ImageTargetConfig", "NeRFTarget", "NeRFTargetConfig", "OptimizerConfig",
           "Render", "Target", "TargetConfig"]
