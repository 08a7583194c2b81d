"""Diffusion priors; each registers its config dataclass as option ``prior/<name>`` (``sdbridge.registry``)."""

from __future__ import annotations

from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior
from sdbridge.priors.base import DiffusionPrior, PriorConfig, TextEmbedding, scaled_linear_alphas_cumprod
from sdbridge.priors.stable_diffusion import PriorUnavailableError, StableDiffusionConfig, StableDiffusionPrior
from sdbridge.priors.random_sd import RandomSDConfig, RandomSDPrior
from sdbridge.priors.tiny import TinySDConfig, TinySDPrior
from sdbridge.registry import build

def build_prior(config: PriorConfig) -> DiffusionPrior:
    return build(config)


__all__ = [
    "AnalyticConfig",
    "AnalyticPrior",
    "DiffusionPrior",
    "PriorConfig",
    "PriorUnavailableError",
    "RandomSDConfig",
    "RandomSDPrior",
    "StableDiffusionConfig",
    "StableDiffusionPrior",
    "TextEmbedding",
    "TinySDConfig",
    "TinySDPrior",
    "build_prior",
    "scaled_linear_alphas_cumprod",
]
