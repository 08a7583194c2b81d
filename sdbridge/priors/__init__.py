"""Diffusion priors; each registers its config dataclass as option ``prior/<name>`` (``sdbridge.registry``)."""

from __future__ import annotations

from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior
from sdbridge.priors.base import DiffusionPrior, PriorConfig, TextEmbedding, scaled_linear_alphas_cumprod
from sdbridge.priors.stable_diffusion import (
    PriorUnavailableError,
    StableDiffusionConfig,
    StableDiffusionPrior,
    check_local_weights,
)
from sdbridge.priors.learned import LearnedConfig, LearnedPrior, check_checkpoint
from sdbridge.priors.random_sd import RandomSDConfig, RandomSDPrior
from sdbridge.priors.tiny import TinySDConfig, TinySDPrior
from sdbridge.registry import build

def build_prior(config: PriorConfig) -> DiffusionPrior:
    return build(config)


def check_prior_files(config: PriorConfig) -> None:
    """Refuse damaged weights a prior would load, before anything is built (one-line ``ValueError``)."""
    if isinstance(config, StableDiffusionConfig) and not isinstance(config, TinySDConfig):
        check_local_weights(config)
    if isinstance(config, LearnedConfig) and config.checkpoint:
        check_checkpoint(config)


__all__ = [
    "AnalyticConfig",
    "AnalyticPrior",
    "DiffusionPrior",
    "LearnedConfig",
    "LearnedPrior",
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
    "check_prior_files",
    "scaled_linear_alphas_cumprod",
]
