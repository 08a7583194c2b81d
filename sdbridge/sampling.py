"""DDIM (Song et al., 2021) on any prior's epsilon: the reference for "what the prior itself can do".

Works for every :class:`~sdbridge.priors.base.DiffusionPrior` (model-space samples; decode them to see images).
Sampling starts from ``prior.sample_x_T`` (N(0, I); the exact prior draws its exact p_T). The timestep grid uses
"trailing" spacing (999, 999 - 1000/N, ...), so sampling starts at the last training step
where x_T ~ N(0, I) is closest to true; the last step lands on abar = 1 (returns the x0 prediction).
"""

from __future__ import annotations

from typing import Sequence

import torch

from sdbridge import rng
from sdbridge.priors.base import DiffusionPrior


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """``eps_u + s * (eps_c - eps_u)`` (diffusers' convention; s = 1 is the conditional prediction)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def cfg_weights(scale: float) -> list[float]:
    """CFG as weights of ``[eps_uncond, eps_cond]``: ``[1 - s, s]`` (``DiffusionPrior.predict_eps``'s ``weights``;
    :func:`sdbridge.priors.base.combine_eps` then computes :func:`classifier_free_guidance` bit for bit)."""
    return [1.0 - scale, scale]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Descending grid of ``num_steps`` timesteps, trailing spacing: 999, 979, ..., 19 for 50 steps."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be in [1, {num_train_timesteps}]")
    step = num_train_timesteps / num_steps
    return (num_train_timesteps - 1 - torch.arange(num_steps) * step).round().long()


def guided_eps(
    prior: DiffusionPrior,
    x: torch.Tensor,
    t: torch.Tensor,
    prompts: Sequence[str],
    scale: float = 1.0,
    negative: str = "",
) -> torch.Tensor:
    """eps with CFG ``eps_u + s (eps_c - eps_u)``; s = 1 costs one conditioning only."""
    cond = prior.encode_text(list(prompts))
    if scale == 1.0:
        return prior.predict_eps(x, t, [cond])[0]
    unc = prior.encode_text([negative] * len(prompts))
    return prior.predict_eps(x, t, [unc, cond], weights=[cfg_weights(scale)])[0]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM (PF-ODE) step from noise level ``abar_from`` to ``abar_to``, in either direction:
    ``x0_hat = (x - sqrt(1 - a_from) eps) / sqrt(a_from)``, ``x' = sqrt(a_to) x0_hat + sqrt(1 - a_to) eps``."""
    x0_hat = (x - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0_hat + (1 - abar_to).sqrt() * eps


def timestep_path(t: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
    """Per-sample evenly spaced integer timesteps from 0 to t: a list of ``num_steps + 1`` tensors of shape (B,)."""
    t = torch.as_tensor(t).long()
    return [torch.div(t * i, num_steps, rounding_mode="floor") if i < num_steps else t for i in range(num_steps + 1)]


def inversion_path(t: torch.Tensor, grid_steps: int, num_train_timesteps: int = 1000, offset: int = 1,
                   clean_start: bool = True) -> list[torch.Tensor]:
    """Per-sample inversion timesteps start -> (grid points below t) -> t, padded at the start to equal length.

    The grid is DDIM's "leading" grid of ``grid_steps`` steps (``{0, 100, ..., 900} + offset`` for 10 steps, as in
    SDI's ``get_inversion_timesteps``). ``clean_start``: the path starts at 0, meaning the clean sample itself (noise
    level 1, see :func:`invert`); otherwise it starts one grid step below the first grid point (``offset - ratio``,
    -99 for 10 steps), as threestudio's SDI does: x0 is read at ``alphas_cumprod[0]`` and the model is evaluated at
    that negative timestep. Padding steps go from the start to the start and leave x unchanged. Returns a list of
    (B,) long tensors.
    """
    ratio = num_train_timesteps // grid_steps
    grid = torch.arange(grid_steps) * ratio + offset
    start = 0 if clean_start else offset - ratio
    paths = []
    for tb in t.tolist():
        inner = [int(g) for g in grid if 0 < g < tb]
        paths.append([start, *inner, int(tb)])
    length = max(len(p) for p in paths)
    paths = [[start] * (length - len(p)) + p for p in paths]
    return [torch.tensor([p[i] for p in paths], device=t.device) for i in range(length)]


def ddpm_posterior_std(abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """sqrt((1 - a_lo) / (1 - a_hi) * (1 - a_hi / a_lo)) between two noise levels (a_lo >= a_hi): the std DDIM's eta
    scales (Song et al., 2021, eq. 16). Symmetric in its arguments."""
    a_lo, a_hi = torch.maximum(abar_from, abar_to), torch.minimum(abar_from, abar_to)
    return ((1 - a_lo) / (1 - a_hi).clamp(min=1e-12) * (1 - a_hi / a_lo)).clamp(min=0).sqrt()


@torch.no_grad()
def ddim_sample(
    prior: DiffusionPrior,
    prompts: Sequence[str],
    num_steps: int = 50,
    eta: float = 0.0,
    scale: float = 1.0,
    negative: str = "",
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one x0 per prompt, ``(B, *sample_shape)`` in model space.

    Args:
        num_steps: DDIM steps; eta: 0 (deterministic, the PF-ODE) to 1 (DDPM-like); scale: CFG scale.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    B = len(prompts)
    shape = (B, *prior.sample_shape)
    x = (prior.sample_x_T(list(prompts), gen) if x_T is None else x_T.clone()).to(prior.device)
    ts = ddim_timesteps(num_steps, prior.num_train_timesteps)
    ac = prior.alphas_cumprod
    for i, t in enumerate(ts):
        a_t = ac[t].float()
        a_prev = ac[ts[i + 1]].float() if i + 1 < len(ts) else torch.tensor(1.0, device=ac.device)
        eps = guided_eps(prior, x, t.expand(B).to(prior.device), prompts, scale, negative)
        x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ddpm_posterior_std(a_prev, a_t)
        x = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * rng.randn(shape, gen).to(x)
    return x
