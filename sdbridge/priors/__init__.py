"""Diffusion priors. ``PRIORS`` maps each prior's config dataclass to its class."""

from __future__ import annotations

from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior
from sdbridge.priors.base import DiffusionPrior, PriorConfig, TextEmbedding, scaled_linear_alphas_cumprod
from sdbridge.priors.stable_diffusion import PriorUnavailableError, StableDiffusionConfig, StableDiffusionPrior
from sdbridge.priors.random_sd import RandomSDConfig, RandomSDPrior
from sdbridge.priors.tiny import TinySDConfig, TinySDPrior

#: config class -> prior class (the most specific config type wins)
PRIORS: dict[type[PriorConfig], type[DiffusionPrior]] = {
    StableDiffusionConfig: StableDiffusionPrior,
    TinySDConfig: TinySDPrior,
    RandomSDConfig: RandomSDPrior,
    AnalyticConfig: AnalyticPrior,
}


def build_prior(config: PriorConfig) -> DiffusionPrior:
    cls = PRIORS.get(type(config))
    if cls is None:
        raise ValueError(f"no prior is registered for config type {type(config).__name__}")
    return cls(config)


__all__ = [
    "AnalyticConfig",
    "AnalyticPrior",
    "PRIORS",
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
