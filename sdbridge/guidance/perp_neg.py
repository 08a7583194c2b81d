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
``f(r) = a exp(-b r) + c`` with threestudio's constants; the views and weights of a step are resolved in the prompt
layer (:func:`sdbridge.views.perp_neg_views`). As threestudio, the positive term is one conditioning on the
interpolated *text embeddings* (:class:`sdbridge.views.TextMix`) on a prior whose texts mix (Stable Diffusion: 4
conditionings per sample); the exact prior's texts are distributions, which do not mix, so there the two positive
*predictions* are interpolated instead (both in the same batched call: 5 conditionings per sample).

It replaces the default CFG eps_tgt of :class:`~sdbridge.guidance.base.Guidance`, so it applies to every method that
keeps that target (SDS, NFSD, CSD, SDI, ISM, VSD, Bridge's stage 1); Bridge's stage 2 uses its own modifier texts.
"""

from __future__ import annotations

import torch

from sdbridge.priors.base import per_sample
from sdbridge.views import PerpNegViews


def perpendicular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The component of each sample of ``x`` perpendicular to the same sample of ``y``."""
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-6)
    return x - coef * y


def perp_neg_guidance(eps: dict[str, torch.Tensor], views: PerpNegViews, scale: float) -> torch.Tensor:
    """``eps_u + s (e_pos + sum_i w_i perp(e_i, e_pos))`` from the named predictions of :meth:`PerpNegViews.texts`
    (either form of the positive)."""
    if "pos" in eps:  # the interpolated embeddings' prediction
        e_pos = eps["pos"] - eps["uncond"]
    else:  # the interpolated predictions
        mix = per_sample(views.mix, eps["uncond"]).to(eps["uncond"])
        e_pos = mix * eps["pos_a"] + (1 - mix) * eps["pos_b"] - eps["uncond"]
    total = e_pos
    for i in range(len(views.negatives)):
        w = per_sample(views.weights[:, i], e_pos).to(e_pos)
        total = total + w * perpendicular(eps[f"neg_{i}"] - eps["uncond"], e_pos)
    return eps["uncond"] + scale * total
