"""Perp-Neg view prompting (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm"), for 3D targets.

Plain view-dependent prompting conditions each camera on "<prompt>, front|side|back view"; the model's bias toward
front views still leaks into side and back views (the Janus problem). Perp-Neg (as in threestudio's prompt
processor) makes the positive term an interpolation between the two nearest views and *subtracts* the other views
as negative prompts, only through their components perpendicular to the positive direction:

    e_pos = eps(pos) - eps_u,   e_i = eps(neg_i) - eps_u
    eps_tgt = eps_u + s * (e_pos + sum_i w_i * perp(e_i, e_pos)),   perp(a, b) = a - (a.b / |b|^2) b

For azimuth |a| < 90 (front half): r = 1 - |a| / 90, pos = r * front + (1 - r) * side, negatives (front, side) with
weights ``-f_fs(r)``, ``-f_sf(1 - r)``; otherwise r = 2 - |a| / 90, pos = r * side + (1 - r) * back, negatives
(side, front) with weights ``-f_sb(r)``, ``-f_fsb(r)``; overhead views use the overhead prompt and no negatives.
``f(r) = a exp(-b r) + c`` with threestudio's constants (below). threestudio interpolates the two positive *text
embeddings*; here the two positive *predictions* are interpolated (both are evaluated in the same batched call), which
works for every prior, the exact one included, at the cost of one more conditioning per sample.

It replaces the default CFG eps_tgt of :class:`~sdbridge.guidance.base.Guidance`, so it applies to every method that
keeps that target (SDS, NFSD, CSD, SDI, ISM, VSD, Bridge's stage 1); Bridge's stage 2 uses its own modifier texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: ``(a, b, c)`` of ``a exp(-b r) + c`` (threestudio ``prompt_processors/base.py``): front-side, side-front,
#: side-back, front-(side)-back.
F_FS = (4.0, 0.5, -2.426)
F_SF = (4.0, 0.5, -2.426)
F_SB = (1.0, 0.5, -0.606)
F_FSB = (1.0, 0.5, 0.967)


def decay(abc: tuple[float, float, float], r: float) -> float:
    a, b, c = abc
    return a * math.exp(-b * r) + c


@dataclass
class PerpNegViews:
    """Per-sample Perp-Neg conditionings of a batch: ``eps_pos = mix * eps(pos_a) + (1 - mix) * eps(pos_b)``."""

    pos_a: list[str]
    pos_b: list[str]
    mix: torch.Tensor  # (B,)
    negatives: list[list[str]]  # 2 lists of B texts
    weights: torch.Tensor  # (B, 2), already negative (subtracted)

    def texts(self) -> dict[str, list[str]]:
        return {"pos_a": self.pos_a, "pos_b": self.pos_b,
                **{f"neg_{i}": list(n) for i, n in enumerate(self.negatives)}}


def perp_neg_views(prompt: str, elevation: torch.Tensor, azimuth: torch.Tensor, view_prompt, uncond: str,
                   overhead_threshold: float = 60.0) -> PerpNegViews:
    """The Perp-Neg conditionings for cameras at ``elevation``, ``azimuth`` (degrees); ``view_prompt(prompt, view)``
    builds a view's text and ``uncond`` fills unused negative slots (weight 0)."""
    front, side, back, overhead = (view_prompt(prompt, v) for v in ("front", "side", "back", "overhead"))
    pos_a, pos_b, mix, neg0, neg1, weights = [], [], [], [], [], []
    for e, a in zip(elevation.tolist(), azimuth.tolist()):
        a = (a + 180) % 360 - 180
        if e > overhead_threshold:
            pos_a.append(overhead), pos_b.append(overhead), mix.append(1.0)
            neg0.append(uncond), neg1.append(uncond), weights.append((0.0, 0.0))
        elif abs(a) < 90:
            r = 1 - abs(a) / 90
            pos_a.append(front), pos_b.append(side), mix.append(r)
            neg0.append(front), neg1.append(side)
            weights.append((-decay(F_FS, r), -decay(F_SF, 1 - r)))
        else:
            r = 2 - abs(a) / 90
            pos_a.append(side), pos_b.append(back), mix.append(r)
            neg0.append(side), neg1.append(front)
            weights.append((-decay(F_SB, r), -decay(F_FSB, r)))
    return PerpNegViews(pos_a, pos_b, torch.tensor(mix), [neg0, neg1], torch.tensor(weights))


def perpendicular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The component of each sample of ``x`` perpendicular to the same sample of ``y``."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-6)
    return x - coef * y


def perp_neg_guidance(eps: dict[str, torch.Tensor], views: PerpNegViews, scale: float) -> torch.Tensor:
    """``eps_u + s (e_pos + sum_i w_i perp(e_i, e_pos))`` from the named predictions of :meth:`PerpNegViews.texts`."""
    shape = (-1,) + (1,) * (eps["uncond"].dim() - 1)
    mix = views.mix.to(eps["uncond"]).view(shape)
    e_pos = mix * eps["pos_a"] + (1 - mix) * eps["pos_b"] - eps["uncond"]
    total = e_pos
    for i in range(len(views.negatives)):
        w = views.weights[:, i].to(e_pos).view(shape)
        total = total + w * perpendicular(eps[f"neg_{i}"] - eps["uncond"], e_pos)
    return eps["uncond"] + scale * total
