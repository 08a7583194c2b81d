"""DDIM inversion of x0 to a timestep: the noise source of SDI and ISM, shared by every guidance.

Inverting x0 along the PF-ODE with the model's own predictions finds the noise that DDIM would map back to x0;
score distillation with that noise instead of a fresh draw follows one DDIM trajectory rather than a different one
at every step (SDI, Lukoianov et al. 2024, section 4).
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdbridge import rng
from sdbridge.guidance.base import Guidance, cfg_sum
from sdbridge.guidance.perp_neg import perp_neg_guidance
from sdbridge.views import StepPrompts
from sdbridge.priors.base import per_sample
from sdbridge.sampling import ddim_step, ddpm_posterior_std


def invert(
    guidance: Guidance,
    x0: torch.Tensor,
    path: Sequence[torch.Tensor],
    prompts: Sequence[str],
    scale: float | None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    uncond_texts: Sequence[str] | None = None,
    perp_neg: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert x0 along ``path`` (list of (B,) timesteps; path[0] = 0 means the clean sample, noise level 1; a negative
    path[0] reads x0 at ``alphas_cumprod[0]``, threestudio's SDI start, see :func:`sdbridge.sampling.inversion_path`).

    Each step evaluates eps at (x, path[i]): CFG ``eps_u + scale (eps_c - eps_u)`` for the prompts (``scale`` may be
    negative, as SDI's -7.5), or the unconditional prediction alone when ``scale`` is None (ISM). The unconditional
    text is ``uncond_texts`` when given (ISM's empty inversion text), else the guidance's negative prompts. With
    ``perp_neg`` and the step's Perp-Neg views set (3D), the guided prediction is the Perp-Neg combination at
    ``scale`` instead of CFG, as threestudio's SDI inverts (its ``predict_noise`` serves both). With
    ``eta > 0`` it adds ``eta * std * N(0, I)`` per step, std the DDPM posterior std between the two levels (SDI uses
    eta = 0.3).

    Returns ``(x at path[-1], eps of the last evaluation)``.
    """
    uncond = guidance.negatives(prompts) if uncond_texts is None else list(uncond_texts)
    views = StepPrompts.of(prompts).perp_neg if perp_neg and scale is not None else None
    # the whole path's noise levels and moves at once: one host sync per call (on a GPU, `bool(moved.any())` each
    # step was one each), the same values as per step
    times = torch.stack([torch.as_tensor(p, device=x0.device) for p in path])  # (L, B)
    levels = guidance.prior.abar(times).to(x0)
    from_levels = torch.where(times == 0, torch.ones_like(levels), levels)  # t = 0: the clean sample, level 1
    moves = times[1:] != times[:-1]  # (L - 1, B)
    any_moved, all_moved = moves.any(1).tolist(), moves.all(1).tolist()
    x = x0
    eps = torch.zeros_like(x0)
    for i in range(len(path) - 1):
        if not any_moved[i] and i < len(path) - 2:
            continue  # padding step for the whole batch: no evaluation needed
        a_from, a_to = per_sample(from_levels[i], x0), per_sample(levels[i + 1], x0)
        if scale is None:
            eps = guidance.predict(x, path[i], uncond=uncond)["uncond"]
        elif views is not None:
            eps = perp_neg_guidance(guidance.predict(x, path[i], uncond=uncond,
                                                        **views.texts(guidance.prior.interpolates_text)), views, scale)
        else:
            eps = guidance.predict(x, path[i], combine={"cfg": cfg_sum(scale)}, uncond=uncond, cond=prompts)["cfg"]
        x_next = ddim_step(x, eps, a_from, a_to)
        if eta > 0:
            noise = rng.randn(x.shape, generator).to(x)
            x_next = x_next + eta * ddpm_posterior_std(a_from, a_to) * noise
        x = x_next if all_moved[i] else torch.where(per_sample(moves[i], x0), x_next, x)
    return x, eps
