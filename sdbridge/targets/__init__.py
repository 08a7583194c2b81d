"""Optimized targets; each registers its config dataclass as option ``target/<name>`` (``sdbridge.registry``)."""

from __future__ import annotations

from sdbridge.targets.base import OptimizerConfig, Render, Target, TargetConfig
from sdbridge.targets.image import ImageTarget, ImageTargetConfig
from sdbridge.targets.nerf.target import NeRFTarget, NeRFTargetConfig

__all__ = ["ImageTarget", "ImageTargetConfig", "NeRFTarget", "NeRFTargetConfig", "OptimizerConfig",
           "Render", "Target", "TargetConfig"]
