"""Classifier Score Distillation (Yu et al., ICLR 2024): only the classifier part of the CFG direction.

    grad = w(t) * ( s (eps_y - eps_0) - lambda(step) (eps_neg - eps_0) )

On the one formula: eps_tgt = CFG_s(x_t; y), eps_src = eps_0 + lambda (eps_neg - eps_0), so without a negative
prompt eps_src is the unconditional prediction. The optional negative term's weight is annealed linearly from
``negative_weight_start`` to ``negative_weight_end`` over the run (the CSD code anneals its negative coefficient,
e.g. from 1 to 0.5 in ``csd-sd-refine.yaml``, CVMI-Lab/Classifier-Score-Distillation). The Bridge paper's 2D code has
no CSD; its scale here is the 2D setting shared with SDS and NFSD, s = 40.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdbridge.guidance.base import Guidance, GuidanceConfig
from sdbridge.registry import builds


@dataclass
class CSDConfig(GuidanceConfig):
    scale: float = 40.0
    csd_negative: str = ""  # "" disables the negative term (2 NFEs per step instead of 3)
    negative_weight_start: float = 1.0
    negative_weight_end: float = 0.5


@builds("guidance", "csd", CSDConfig)
class CSD(Guidance):
    SUMMARY = {"eps_tgt": "CFG_s(x_t; y)", "eps_src": "eps_0 + lambda(step) (eps_neg - eps_0)", "noise": "fresh N(0, I)", "nfe": "2 (3 with csd_negative)"}

    def negative_weight(self, step: int) -> float:
        c = self.config
        frac = min(1.0, step / max(1, self.max_steps - 1))
        return c.negative_weight_start + frac * (c.negative_weight_end - c.negative_weight_start)

    def source_texts(self, prompts, step):
        texts = {"uncond": self.negatives(prompts)}
        if self.config.csd_negative:
            texts["neg"] = [self.config.csd_negative] * len(prompts)
        return texts

    def source_from(self, eps, x_t, t, kappa, prompts, step):
        if "neg" not in eps:
            return eps["uncond"]
        return eps["uncond"] + self.negative_weight(step) * (eps["neg"] - eps["uncond"])
