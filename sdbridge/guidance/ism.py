"""Interval Score Matching (ISM; LucidDreamer, Liang et al., CVPR 2024).

With s = t - delta_t (clamped at 1), x_s is reached by DDIM inversion of x0 with the unconditional prediction for the
inversion text "" in strides of ``inversion_stride`` (at most ``inversion_steps`` steps), x_t by one more inversion
step from s to t, and::

    grad = lambda_guidance * w(t) * ( CFG_7.5(x_t, t; y, negative) - eps_0(x_s, s) ),   w = sqrt((1 - abar) / abar)

On the one formula: x_t comes from inversion and kappa = eps_0(x_s, s), the prediction of the last inversion step
(the source). NFEs per step: inversion steps + 1 (the step s -> t) + 2 (CFG).

Defaults = the official code, EnVision-Research/LucidDreamer at commit 2ecf0936617103107e4b20c34e94d204196f7a44:

* ``guidance/sd_utils.py`` ``StableDiffusion.train_step`` (l. 346-466) and ``add_noise_with_cfg`` (l. 159-215): the
  official t is an index into ``scheduler.timesteps`` after ``set_timesteps(1000)`` (flipped: 1, 2, ..., 1000), so
  index i is timestep i + 1 (``scheduler=shrinking_max`` draws the timestep itself); x0 is first noised with the
  step's noise to the timestep of ``starting_ind = max(ind_prev_t - xs_delta_t * xs_inv_steps, 0)``, i.e. to t = 1
  (``noised_start``); the inversion evaluates the UNet at timesteps 1, 201, 401, ... below s, then at s (the step
  to t), with ``inverse_text`` "" (``denoise_guidance_scale`` 1: no CFG) while the target's CFG uses the negative
  prompt; ``delta_t = int(delta_t + warm_up_rate * (delta_t_start - delta_t))`` (``train_step_perpneg``, l. 250,
  rounds the warm-up term up: ``delta_t_ceil``); noise ``randn + 0.1 randn(1, C, 1, 1)`` shared over the batch
  (``offset_noise``); ``grad = nan_to_num(lambda_guidance * w (eps_u + 7.5 (eps_c - eps_u) - target))``.
* ``arguments/__init__.py`` ``GuidanceParams`` (l. 57-109): delta_t 80, delta_t_start 100, annealing_intervals,
  inverse_text '', negative '', guidance_scale 7.5, denoise_guidance_scale 1.0, xs_delta_t 200, xs_inv_steps 5,
  xs_eta 0 (not exposed here: every official config uses 0); ``OptimizationParams.warmup_iter`` 1500 (l. 189).
* ``configs/*.yaml``: lambda_guidance 0.1 in every config (the code default is 1); delta_t 80 (bagel, crown,
  cat_armor, ts_lora), 50 (hamburger, football_helmet, white_hair_ironman, zombie_joker) or 25 (axe): presets
  ``experiment=ism_<config>``.

Every option restoring sdbridge's earlier ISM is off by default; the parity test is ``tests/parity/test_ism_parity.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdbridge import rng
from sdbridge.guidance.base import Guidance, GuidanceConfig, Weighting
from sdbridge.guidance.inversion import invert
from sdbridge.priors.base import per_sample
from sdbridge.schedules import warmup_rate
from sdbridge.registry import builds


@dataclass
class ISMConfig(GuidanceConfig):
    scale: float = 7.5  # guidance_scale, eps_u + s (eps_c - eps_u) as in the official code
    weighting: Weighting = Weighting.sigma
    lambda_guidance: float = 0.1  # multiplies the gradient (every official config; the code default is 1)
    delta_t: int = 80  # s = t - delta_t after the warm-up (official configs: 80, 50 or 25)
    delta_t_start: int = 100  # delta_t at the start of the warm-up
    delta_t_warmup_steps: int = 1500  # warm-up length (warmup_iter); 0: a fixed delta_t (annealing_intervals false)
    delta_t_ceil: bool = False  # round the warm-up term up, as train_step_perpneg (configs with perpneg: true)
    inversion_stride: int = 200  # xs_delta_t
    inversion_steps: int = 5  # xs_inv_steps
    inversion_text: str = ""  # inverse_text: the text of the unconditional inversion
    invert_with_negative: bool = False  # invert with the negative prompt instead (sdbridge's earlier ISM)
    noised_start: bool = True  # noise x0 to t = 1 with the step's noise first; false: invert the clean x0 from t = 0
    offset_noise: float = 0.1  # noise = randn + offset_noise * randn(1, C, 1, 1) (one offset per batch); 0: plain

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("delta_t", "delta_t_start", "inversion_stride", "inversion_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"guidance.{key}={getattr(self, key)} must be >= 1")
        if self.delta_t_warmup_steps < 0:
            raise ValueError(f"guidance.delta_t_warmup_steps={self.delta_t_warmup_steps} must be >= 0")
        if self.offset_noise < 0:
            raise ValueError(f"guidance.offset_noise={self.offset_noise} must be >= 0")


@builds("guidance", "ism", ISMConfig)
class ISM(Guidance):
    SUMMARY = {"eps_tgt": "CFG_s(x_t; y), grad x lambda_guidance",
               "eps_src": "kappa = eps_0(x_s, s), s = t - delta_t (delta_t warmed up)",
               "noise": "x0 noised to t = 1, unconditional DDIM inversion (\"\") to s, one more step to t",
               "nfe": "inversion steps + 1 + 2"}

    def delta_t(self, step: int) -> int:
        """delta_t at ``step``: from delta_t_start (step -1) to delta_t over the warm-up, truncated as the official
        ``int(...)`` (or its warm-up term rounded up, ``delta_t_ceil``)."""
        c = self.config
        rate = warmup_rate(step, c.delta_t_warmup_steps)
        if c.delta_t_ceil:
            return int(c.delta_t + math.ceil(rate * (c.delta_t_start - c.delta_t)))
        return int(c.delta_t + rate * (c.delta_t_start - c.delta_t))

    def inversion_texts(self, prompts):
        if self.config.invert_with_negative:
            return self.negatives(prompts)
        return [self.config.inversion_text] * len(prompts)

    def texts(self, prompts):
        texts, inversion = super().texts(prompts), self.inversion_texts(prompts)
        return texts if inversion in texts else [*texts, inversion]

    def sample_noise(self, x0):
        noise = super().sample_noise(x0)
        if self.config.offset_noise > 0:
            shape = (1, x0.shape[1], *([1] * (x0.dim() - 2)))
            offset = rng.per_sample(self.generator, x0.shape[0], lambda g: torch.randn(shape, generator=g))
            noise = noise + self.config.offset_noise * offset.to(noise)
        return noise

    def make_x_t(self, x0, t, noise, prompts, step):
        c = self.config
        first = 1 if c.noised_start else 0
        s = (t - self.delta_t(step)).clamp(min=first)
        start = (s - c.inversion_stride * c.inversion_steps).clamp(min=first)
        # start, start + stride, ... (below s; shorter paths padded at the start), then s, then t
        grids = [list(range(a, b, c.inversion_stride)) for a, b in zip(start.tolist(), s.tolist())]
        length = max(len(g) for g in grids)
        grids = [[g[0] if g else b] * (length - len(g)) + g for g, b in zip(grids, s.tolist())]
        path = [torch.tensor(col, device=t.device) for col in zip(*grids)] + [s, t]
        x = torch.where(per_sample(path[0] > 0, x0), self.add_noise(x0, noise, path[0]), x0)
        x_t, eps_s = invert(self, x, path, prompts, scale=None, uncond_texts=self.inversion_texts(prompts))
        return x_t, t, eps_s

    def gradient(self, x0, prompts, step, t, noise):
        grad, t, extras = super().gradient(x0, prompts, step, t, noise)
        return self.config.lambda_guidance * grad, t, {**extras, "delta_t": self.delta_t(step)}
