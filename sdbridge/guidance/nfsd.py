"""Noise-Free Score Distillation (Katzir et al., ICLR 2024).

    grad = w(t) * ( s (eps_y - eps_0) + delta_D ),   delta_D = eps_0 if t < 200 else eps_0 - eps_neg

i.e. on the one formula: eps_tgt = CFG_s(x_t; y) (uncond ""), eps_src = 0 for t < 200 and eps_neg otherwise.
The three conditionings (uncond, prompt, negative) go in one batched call: 3 NFEs per step (the Bridge paper's code
makes two batched calls, 4 NFEs). Defaults from davidmcall/SDS-Bridge ``2D_experiments/guidance.py``: s = 40 (its
2D scale, eps_u + s(eps_c - eps_u)), the switch at raw timestep 200, and the negative prompt below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdbridge.guidance.base import Guidance, GuidanceConfig
from sdbridge.priors.base import per_sample
from sdbridge.registry import builds

NFSD_NEGATIVE = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


@dataclass
class NFSDConfig(GuidanceConfig):
    scale: float = 40.0
    nfsd_negative: str = NFSD_NEGATIVE  # the negative prompt of the delta_D term
    switch_t: int = 200  # below it delta_D = eps_0 (no negative term)


@builds("guidance", "nfsd", NFSDConfig)
class NFSD(Guidance):
    SUMMARY = {"eps_tgt": "CFG_s(x_t; y)", "eps_src": "0 if t < 200, else eps(x_t; negative)", "noise": "fresh N(0, I)", "nfe": "3"}

    def source_texts(self, prompts, step):
        return {"neg": [self.config.nfsd_negative] * len(prompts)}

    def source_from(self, eps, x_t, t, kappa, prompts, step):
        low = per_sample(t < self.config.switch_t, x_t)
        return torch.where(low, torch.zeros_like(eps["neg"]), eps["neg"])
