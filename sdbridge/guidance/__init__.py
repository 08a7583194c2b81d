"""Guidances: one file per method over :mod:`sdbridge.guidance.base`.

Each method registers its config dataclass as option ``guidance/<name>`` (``sdbridge.registry``);
``build_guidance`` instantiates from a config.
A new method is a file here, an entry below, and a YAML in ``conf/guidance/``.
"""

from __future__ import annotations

import torch

from sdbridge.guidance.base import (
    Guidance,
    GuidanceConfig,
    GuidanceOutput,
    NonFiniteGradientError,
    Weighting,
    classifier_free_guidance,
    surrogate_loss,
)
from sdbridge.guidance.bridge import Bridge, BridgeConfig
from sdbridge.guidance.csd import CSD, CSDConfig
from sdbridge.guidance.ism import ISM, ISMConfig
from sdbridge.guidance.nfsd import NFSD, NFSDConfig
from sdbridge.guidance.sdi import SDI, SDICached, SDICachedConfig, SDIConfig
from sdbridge.guidance.sds import SDS, SDSConfig
from sdbridge.guidance.vsd import VSD, VSDConfig
from sdbridge.priors.base import DiffusionPrior
from sdbridge.registry import build
from sdbridge.schedules import TimestepSchedule
from sdbridge.views import ViewPrompting

def build_guidance(
    config: GuidanceConfig, prior: DiffusionPrior, schedule: TimestepSchedule, generator: torch.Generator | None,
    view_prompting: ViewPrompting | None = None,
) -> Guidance:
    return build(config, prior, schedule, generator, view_prompting)


__all__ = [
    "CSD",
    "CSDConfig",
    "Bridge",
    "BridgeConfig",
    "ISM",
    "ISMConfig",
    "NFSD",
    "NFSDConfig",
    "SDI",
    "SDICached",
    "SDICachedConfig",
    "SDIConfig",
    "VSD",
    "VSDConfig",
    "Guidance",
    "GuidanceConfig",
    "GuidanceOutput",
    "NonFiniteGradientError",
    "SDS",
    "SDSConfig",
    "Weighting",
    "build_guidance",
    "classifier_free_guidance",
    "surrogate_loss",
]
