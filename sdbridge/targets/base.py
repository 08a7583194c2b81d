"""What every optimized target provides to the training system."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sdbridge.views import ViewPrompting, Views


@dataclass
class OptimizerConfig:
    """AdamW. Defaults are the Bridge paper's 2D settings (davidmcall/SDS-Bridge): lr 0.01, betas (0.9, 0.99),
    eps 1e-15, and torch's default weight decay 0.01."""

    lr: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"target.optimizer.lr={self.lr} must be > 0 and finite")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"target.optimizer.betas={list(self.betas)} must be two numbers in [0, 1)")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"target.optimizer.eps={self.eps} must be > 0 and finite")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"target.optimizer.weight_decay={self.weight_decay} must be >= 0")

    def build(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params, lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay
        )


@dataclass
class TargetConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def protocol_fields(self) -> dict[str, Any]:
        """What of this target must match for two runs to share a comparison table (JSON values)."""
        return {}

    def view_prompting(self) -> ViewPrompting:
        """How this target's views change the guidance's texts (none for image targets)."""
        return ViewPrompting()


@dataclass
class Render:
    """A target's output for one step: either images in [0, 1] (to be encoded by the prior) or model-space x0;
    optionally the step's per-sample prompts and the cameras it was rendered from (3D targets: the guidance resolves
    the view-dependent texts and conditions VSD's LoRA on them)."""

    images: Optional[torch.Tensor] = None
    x0: Optional[torch.Tensor] = None
    prompts: Optional[list[str]] = None  # one per sample (a 3D target's batch of cameras)
    views: Optional[Views] = None


class Target(nn.Module, abc.ABC):
    """Base class: ``forward(batch) -> Render``, ``regularizers(step)``, ``export(dir)``. Subclasses implement
    :meth:`forward`, :meth:`model_samples`, :meth:`preview` and :meth:`export`."""

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any]) -> Render:
        """The step's render of the current state."""

    def initial_noise(self) -> torch.Tensor | None:
        """The eps prediction the initialization was made from (``target.init=denoised`` on latents), else None:
        ``guidance=sdi_cached`` takes it as its first kappa, as the SDI notebook does."""
        return None

    def regularizers(self, step: int) -> dict[str, torch.Tensor]:
        return {}

    def datamodule(self) -> Any:
        """A LightningDataModule of training batches (cameras), or None: the target needs no data."""
        return None

    def guidance_prompts(self, prompts: list[str]) -> list[str]:
        """Every text a training step may condition on (encoded once, before training, to fail early)."""
        return list(prompts)

    def sample_prompts(self, prompts: list[str]) -> list[str]:
        """The prompt of each of :meth:`model_samples`' samples."""
        return list(prompts)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return self.config.optimizer.build(self.parameters())

    @abc.abstractmethod
    def model_samples(self) -> torch.Tensor:
        """The current samples in the prior's model space ``(N, *sample_shape)`` (what exact metrics evaluate)."""

    @abc.abstractmethod
    def preview(self) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] that show the current state (for grids and videos)."""

    @abc.abstractmethod
    def export(self, directory: Path, names: list[str]) -> list[Path]:
        """Write the final outputs into ``directory``; returns their paths (one image per sample first)."""
