"""Score Distillation Sampling (Poole et al., DreamFusion, 2022).

    eps_tgt = eps_u + s * (eps_c - eps_u)        eps_src = kappa (the noise that made x_t)

One batched denoiser call of 2 conditionings per step (2 NFEs). Default s = 40, the 2D setting of the Bridge
paper's code (davidmcall/SDS-Bridge); its 3D setting is s = 100 (threestudio's 100 in its own ``eps_c + s'(...)``
convention is s = 101 here; ``experiment=nerf_sds`` and ``nerf_bridge`` use 100, the value the Bridge paper states).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdbridge.guidance.base import Guidance, GuidanceConfig
from sdbridge.registry import builds


@dataclass
class SDSConfig(GuidanceConfig):
    scale: float = 40.0


@builds("guidance", "sds", SDSConfig)
class SDS(Guidance):
    """The base formula with its defaults: fresh noise, CFG target, the noise as source."""
    SUMMARY = {"eps_tgt": "CFG_s(x_t; y)", "eps_src": "kappa", "noise": "fresh N(0, I)", "nfe": "2"}

