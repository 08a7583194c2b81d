"""threestudio's SDI guidance (PR #508) and the SDI notebook's loop, re-derived on diffusers.

Official sources read: threestudio-project/threestudio at commit ``1ade495b80027171ba5e3167ba75dd9247175f31`` (the
SDI authors' commit "2D experiments, independence from the diffusers version"; the repository's later commits,
``28d9d80`` included, only reformat these files):

* ``threestudio/models/guidance/stable_diffusion_sdi_guidance.py``: ``configure`` (the pipeline in fp16 by default,
  ``half_precision_weights``; ``DDIMScheduler`` with ``set_timesteps(n_ddim_steps=50)``, ``DDIMInverseScheduler``
  with ``set_timesteps(inversion_n_steps)``), ``forward_unet`` (casts to the weights' dtype and back),
  ``predict_noise`` (``no_grad``; without Perp-Neg ``eps_c + s (eps_c - eps_u)`` from one UNet call on
  ``[cond, uncond]``, the embeddings asked from the prompt processor for the cameras at every call; with Perp-Neg
  ``eps_u + s (...)``), ``get_inversion_timesteps`` (the inverse scheduler's "leading" grid
  ``arange(10) * 100 + steps_offset``, those ``< int(invert_to_t)``, prepended ``timesteps[0] - step_ratio`` = -99,
  appended ``min(invert_to_t + delta_t, 999)`` with ``delta_t = int(random.random() * 1000 // 10)``),
  ``ddim_inversion_step`` (``alphas_cumprod[timestep]`` or, for a negative timestep, ``initial_alpha_cumprod``;
  deterministic DDIM to ``prev_timestep``, then ``+ inversion_eta * randn_like * sqrt(_get_variance(prev_timestep,
  timestep))``), ``invert_noise`` (the UNet at every timestep but the last, -99 first), ``get_noise_from_target``,
  ``get_x0`` (``scheduler.step(...).pred_original_sample``), ``compute_grad_sdi`` (the CFG prediction on the inverted
  latent at the UN-jittered t; ``call_with_defined_noise``: ``scheduler.add_noise`` instead of the inversion),
  ``__call__`` (the input permuted and interpolated to 512x512 even when it is used as latents; t ~ ``randint(
  min_step, max_step + 1)``; the loss ``0.5 * mse(latents, target, "mean") / B`` and ``grad_norm``) and
  ``update_step`` (t annealed: ``min_step = max_step = int(1000 ((max - min) (1 - step / trainer_max_steps) +
  min))``);
* ``threestudio/models/prompt_processors/base.py``: ``PromptProcessorOutput.get_text_embeddings`` (each camera's
  direction picked by the four view conditions, front/back thresholds 45 deg, overhead 60 deg; ``cat([cond,
  uncond])``), the view-dependent texts ``"<prompt>, <view> view"`` and the Perp-Neg embeddings and weights;
* ``2dplayground_SDI_version.ipynb``: the guidance config (7.5 / -7.5 without Perp-Neg, 10 inversion steps, eta 0.3,
  t anneal 0.98 -> 0.02 over 1000), the init ``get_x0`` of ``randn * init_noise_sigma`` at t = 999, ``Adam([latent],
  lr=0.1, weight_decay=0)``, the "Cache kappa" loop (a refresh every 25 steps with the previous eps prediction as
  the noise) and the "DDIM inversion" loop (the guidance called on the image); a figure every 5 steps;
* ``configs/sdi.yaml`` (3D, Perp-Neg on) and ``threestudio/systems/sdi.py`` (``training_step``: the guidance on the
  render, ``loss_sdi`` times its weight, backward, one optimizer step).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.parity.official.pipeline import DiffusersSD, ModelSource, save_png

# ---------------------------------------------------------------- constants typed from the official code
OFFICIAL_NUM_TRAIN_TIMESTEPS = 1000  # SD 2.1 base scheduler config
OFFICIAL_N_DDIM_STEPS = 50  # StableDiffusionSDIGuidance.Config.n_ddim_steps (scheduler.set_timesteps before step())
# The notebook's guidance config (threestudio convention without Perp-Neg: eps_c + s (eps_c - eps_u))
NOTEBOOK_GUIDANCE_SCALE = 7.5
NOTEBOOK_INVERSION_GUIDANCE_SCALE = -7.5
NOTEBOOK_INVERSION_N_STEPS = 10
NOTEBOOK_INVERSION_ETA = 0.3
NOTEBOOK_MIN_STEP_PERCENT = 0.02
NOTEBOOK_MAX_STEP_PERCENT = 0.98
NOTEBOOK_N_ITERS = 1000  # n_iters = max_iters = trainer_max_steps; the loop runs range(n_iters + 1)
NOTEBOOK_T_N_STEPS = 40  # t_interval = n_iters // t_n_steps = 25
NOTEBOOK_LR = 1e-1  # torch.optim.Adam([latent], lr=lr, weight_decay=0): Adam's default betas and eps
NOTEBOOK_ADAM_BETAS = (0.9, 0.999)
NOTEBOOK_ADAM_EPS = 1e-8
NOTEBOOK_WEIGHT_DECAY = 0.0
NOTEBOOK_INIT_T = 999  # time = torch.tensor(B * [999])
NOTEBOOK_PROMPT = "bagel filled with cream cheese and lox"
NOTEBOOK_VIEW_SUFFIX = ", front view"  # threestudio's view-dependent prompt at elevation 0, azimuth 0
# get_inversion_timesteps: delta_t = int(random.random() * num_train_timesteps // inversion_n_steps) in {0..99}
OFFICIAL_JITTER = OFFICIAL_NUM_TRAIN_TIMESTEPS // NOTEBOOK_INVERSION_N_STEPS
# threestudio prompt_processors/base.py Config: Perp-Neg's decay functions a exp(-b r) + c and the overhead threshold
PERP_NEG_F_SB = (1, 0.5, -0.606)
PERP_NEG_F_FSB = (1, 0.5, +0.967)
PERP_NEG_F_FS = (4, 0.5, -2.426)
PERP_NEG_F_SF = (4, 0.5, -2.426)
PERP_NEG_OVERHEAD_THRESHOLD = 60.0


def shifted_expotional_decay(a, b, c, r):  # threestudio utils/ops.py
    return a * torch.exp(-b * r) + c


def perpendicular_component(x, y):  # threestudio utils/ops.py
    eps = torch.ones_like(x[:, 0, 0, 0]) * 1e-6
    return x - (torch.mul(x, y).sum(dim=[1, 2, 3]) / torch.maximum(torch.mul(y, y).sum(dim=[1, 2, 3]), eps)).view(
        -1, 1, 1, 1) * y



# ---------------------------------------------------------------- the guidance
class OfficialSDI(DiffusersSD):
    """threestudio's ``StableDiffusionSDIGuidance`` (commit 1ade495) with the notebook's config, on a diffusers model,
    for one image (B = 1) at a time. Random draws can be given: ``random_value`` replaces ``random.random()`` and
    ``noises`` yields what ``torch.randn_like`` would, one per inversion step; None draws them as the official code.

    ``text_embeddings`` arguments are ``cat([cond, uncond])`` or a :class:`CameraTexts` (the prompt processor asked
    for the cameras' embeddings at every UNet call, as ``predict_noise`` does). ``weights_dtype``: the UNet's dtype
    (threestudio's ``half_precision_weights``: fp16), inputs cast to it and outputs back by :meth:`forward_unet`.
    """

    def __init__(self, source: ModelSource, device: torch.device | str = "cpu", weights_dtype=torch.float32,
                 trainer_max_steps: int = NOTEBOOK_N_ITERS):
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        super().__init__(source, device, weights_dtype)
        self.weights_dtype = weights_dtype
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.scheduler.set_timesteps(OFFICIAL_N_DDIM_STEPS, device=self.device)
        self.inverse_scheduler = DDIMInverseScheduler.from_config(self.pipe.scheduler.config)
        self.inverse_scheduler.set_timesteps(NOTEBOOK_INVERSION_N_STEPS, device=self.device)
        for scheduler in (self.scheduler, self.inverse_scheduler):  # indexed with timesteps on the device
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device=self.device)
        self.inversion_n_steps = NOTEBOOK_INVERSION_N_STEPS
        self.inversion_eta = NOTEBOOK_INVERSION_ETA
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.trainer_max_steps = trainer_max_steps
        self.set_min_max_steps(NOTEBOOK_MIN_STEP_PERCENT, NOTEBOOK_MAX_STEP_PERCENT)

    def set_min_max_steps(self, min_step_percent: float, max_step_percent: float) -> None:
        self.min_step = int(self.num_train_timesteps * min_step_percent)
        self.max_step = int(self.num_train_timesteps * max_step_percent)

    def update_step(self, global_step: int) -> None:
        """t_anneal: ``min_step = max_step`` on the line from 0.98 to 0.02 over ``trainer_max_steps``."""
        percentage = float(global_step) / self.trainer_max_steps
        pct = (NOTEBOOK_MAX_STEP_PERCENT - NOTEBOOK_MIN_STEP_PERCENT) * (1 - percentage) + NOTEBOOK_MIN_STEP_PERCENT
        self.set_min_max_steps(pct, pct)

    def forward_unet(self, latents, t, encoder_hidden_states):
        input_dtype = latents.dtype
        return self.unet(latents.to(self.weights_dtype), t.to(self.weights_dtype),
                         encoder_hidden_states=encoder_hidden_states.to(self.weights_dtype)).sample.to(input_dtype)

    # -- the prompt processor: cond and uncond ("" = its default negative prompt) embeddings (DiffusersSD.text)
    def embeddings(self, prompt: str) -> torch.Tensor:
        """``get_text_embeddings``: ``cat([cond, uncond])`` (threestudio's order)."""
        return torch.cat([self.text(prompt), self.text("")])

    @torch.no_grad()
    def predict_noise(self, latents_noisy, t, text_embeddings, guidance_scale):
        """Without Perp-Neg: ``noise_pred_text + guidance_scale * (noise_pred_text - noise_pred_uncond)``."""
        if callable(text_embeddings):
            text_embeddings = text_embeddings()
        latent_model_input = torch.cat([latents_noisy] * 2, dim=0)
        noise_pred = self.forward_unet(latent_model_input, torch.cat([t] * 2), encoder_hidden_states=text_embeddings)
        noise_pred_text, noise_pred_uncond = noise_pred.chunk(2)
        return noise_pred_text + guidance_scale * (noise_pred_text - noise_pred_uncond)

    @torch.no_grad()
    def predict_noise_perp_neg(self, latents_noisy, t, text_embeddings, neg_guidance_weights, guidance_scale):
        """With Perp-Neg: one UNet call on ``[pos, uncond, neg_1, neg_2]`` (``get_text_embeddings_perp_neg``'s order),
        ``e_pos = text - uncond``, ``accum = sum_i w_i perpendicular_component(neg_i - uncond, e_pos)``, then
        ``uncond + guidance_scale (e_pos + accum)``."""
        batch_size = latents_noisy.shape[0]
        noise_pred = self.forward_unet(torch.cat([latents_noisy] * 4, dim=0), torch.cat([t] * 4),
                                       encoder_hidden_states=text_embeddings)
        noise_pred_text = noise_pred[:batch_size]
        noise_pred_uncond = noise_pred[batch_size: batch_size * 2]
        noise_pred_neg = noise_pred[batch_size * 2:]
        e_pos = noise_pred_text - noise_pred_uncond
        accum_grad = 0
        n_negative_prompts = neg_guidance_weights.shape[-1]
        for i in range(n_negative_prompts):
            e_i_neg = noise_pred_neg[i::n_negative_prompts] - noise_pred_uncond
            accum_grad += neg_guidance_weights[:, i].view(-1, 1, 1, 1) * perpendicular_component(e_i_neg, e_pos)
        return noise_pred_uncond + guidance_scale * (e_pos + accum_grad)

    def text_embeddings_perp_neg(self, prompt: str, elevation: float, azimuth: float):
        """``get_text_embeddings_perp_neg`` for one camera below the overhead threshold: the view texts
        ``"<prompt>, side|front|back view"``, the uncond text "" (its default negative prompt), the interpolated
        positive embedding, the two negatives and their weights ``-shifted_expotional_decay(*f, r)``."""
        assert elevation <= PERP_NEG_OVERHEAD_THRESHOLD
        side, front, back = (self.text(f"{prompt}, {view} view") for view in ("side", "front", "back"))
        uncond = self.text("")
        azi = torch.tensor(float(azimuth))
        azi = (azi + 180) % 360 - 180  # shift_azimuth_deg
        if torch.abs(azi) < 90:
            r_inter = 1 - torch.abs(azi) / 90
            pos = r_inter * front + (1 - r_inter) * side
            negs = [front, side]
            weights = [-shifted_expotional_decay(*PERP_NEG_F_FS, r_inter),
                       -shifted_expotional_decay(*PERP_NEG_F_SF, 1 - r_inter)]
        else:
            r_inter = 2.0 - torch.abs(azi) / 90
            pos = r_inter * side + (1 - r_inter) * back
            negs = [side, front]
            weights = [-shifted_expotional_decay(*PERP_NEG_F_SB, r_inter),
                       -shifted_expotional_decay(*PERP_NEG_F_FSB, r_inter)]
        return torch.cat([pos, uncond, *negs]), torch.as_tensor(weights).reshape(1, 2)

    def ddim_inversion_step(self, model_output, timestep, prev_timestep, sample, noise=None):
        inv = self.inverse_scheduler
        alpha_prod_t = inv.alphas_cumprod[timestep] if timestep >= 0 else inv.initial_alpha_cumprod
        alpha_prod_t_prev = inv.alphas_cumprod[prev_timestep]
        beta_prod_t = 1 - alpha_prod_t
        assert inv.config.prediction_type == "epsilon" and not inv.config.clip_sample
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_epsilon = model_output
        pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
        variance = self.scheduler._get_variance(prev_timestep, timestep) ** 0.5  # the official argument order
        noise = torch.randn_like(prev_sample) if noise is None else noise
        prev_sample = prev_sample + self.inversion_eta * noise * variance
        return prev_sample

    def get_inversion_timesteps(self, invert_to_t, B, random_value: float | None = None):
        n_training_steps = self.inverse_scheduler.config.num_train_timesteps
        effective_n_inversion_steps = self.inversion_n_steps
        assert self.inverse_scheduler.config.timestep_spacing == "leading"
        step_ratio = n_training_steps // effective_n_inversion_steps
        timesteps = (np.arange(0, effective_n_inversion_steps) * step_ratio).round().copy().astype(np.int64)
        timesteps += self.inverse_scheduler.config.steps_offset
        timesteps = timesteps[timesteps < int(invert_to_t)]
        timesteps = np.concatenate([[int(timesteps[0] - step_ratio)], timesteps])
        timesteps = torch.from_numpy(timesteps).to(self.device)
        random_value = random.random() if random_value is None else random_value
        delta_t = int(random_value * self.inverse_scheduler.config.num_train_timesteps // self.inversion_n_steps)
        last_t = torch.tensor(min(int(invert_to_t) + delta_t, self.inverse_scheduler.config.num_train_timesteps - 1),
                              device=self.device)
        timesteps = torch.cat([timesteps, last_t.repeat([B])])
        return timesteps, delta_t

    @torch.no_grad()
    def invert_noise(self, start_latents, invert_to_t, text_embeddings, random_value=None,
                     noises: Iterator[torch.Tensor] | None = None, predict=None):
        """``predict(latents, t)``: the guided prediction ``predict_noise`` makes at the inversion scale (default: the
        notebook's, without Perp-Neg)."""
        if predict is None:
            def predict(x, tt):
                return self.predict_noise(x, tt, text_embeddings, NOTEBOOK_INVERSION_GUIDANCE_SCALE)
        latents = start_latents.clone()
        B = start_latents.shape[0]
        assert B == 1, "threestudio's SDI inverts one image (int(invert_to_t))"
        timesteps, _ = self.get_inversion_timesteps(invert_to_t, B, random_value)
        evaluated = []
        for t, next_t in zip(timesteps[:-1], timesteps[1:]):
            noise_pred = predict(latents, t.repeat([B]))
            evaluated.append(int(t))
            latents = self.ddim_inversion_step(noise_pred, t, next_t, latents, None if noises is None else next(noises))
        found_noise = self.get_noise_from_target(start_latents, latents, next_t)
        return latents, found_noise, timesteps, evaluated

    def get_noise_from_target(self, target, cur_xt, t):
        alpha_prod_t = self.scheduler.alphas_cumprod[t]
        return (cur_xt - target * alpha_prod_t ** 0.5) / ((1 - alpha_prod_t) ** 0.5)

    def get_x0(self, original_samples, noise_pred, t):
        return self.scheduler.step(noise_pred, t[0], original_samples, return_dict=True).pred_original_sample

    @torch.no_grad()
    def compute_grad_sdi(self, latents, t, text_embeddings, guidance_scale=NOTEBOOK_GUIDANCE_SCALE, random_value=None,
                         noises=None, call_with_defined_noise=None):
        """Returns ``(target x0_hat, latents_noisy, noise_pred)``."""
        if call_with_defined_noise is not None:
            latents_noisy = self.scheduler.add_noise(latents, call_with_defined_noise.clone(), t)
        else:
            latents_noisy, _, _, _ = self.invert_noise(latents, t, text_embeddings, random_value, noises)
        noise_pred = self.predict_noise(latents_noisy, t, text_embeddings, guidance_scale)
        latents_denoised = self.get_x0(latents_noisy, noise_pred, t).detach()
        return latents_denoised, latents_noisy, noise_pred

    @staticmethod
    def loss_gradient(latents, target):
        """The gradient of ``__call__``'s ``0.5 * mse(latents, target, "mean") / batch_size``."""
        x = latents.detach().clone().requires_grad_(True)
        loss = 0.5 * F.mse_loss(x, target.detach(), reduction="mean") / x.shape[0]
        (grad,) = torch.autograd.grad(loss, x)
        return grad

    @staticmethod
    def anneal_t(step: int, trainer_max_steps: int, min_pct: float, max_pct: float, n_train: int = 1000) -> int:
        """``update_step`` with t_anneal, then ``torch.randint(min_step, max_step + 1)`` (min_step = max_step)."""
        percentage = float(step) / trainer_max_steps
        curr_percent = (max_pct - min_pct) * (1 - percentage) + min_pct
        min_step = int(n_train * curr_percent)
        max_step = int(n_train * curr_percent)
        assert min_step == max_step
        return min_step

    def denoised_init(self, x_T: torch.Tensor, text_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """The notebooks' initialization: ``get_x0`` of ``x_T * init_noise_sigma`` at t = 999 with CFG 7.5; returns
        the latent and that eps prediction."""
        time = torch.tensor([NOTEBOOK_INIT_T], device=self.device)
        init_noise = x_T.to(self.device) * self.scheduler.init_noise_sigma
        noise_pred = self.predict_noise(init_noise, time, text_embeddings, NOTEBOOK_GUIDANCE_SCALE)
        return self.get_x0(init_noise, noise_pred, time).detach(), noise_pred

    def __call__(self, rgb: torch.Tensor, text_embeddings, rgb_as_latents: bool = True) -> dict[str, Any]:
        """``__call__`` with ``rgb_as_latents`` (the notebook's "Cache kappa" call, here without a defined noise: the
        inversion of every step, as the 3D system's call): the input is permuted and interpolated to 512x512 first,
        as the official code does whatever the input is, then t is drawn and the target computed."""
        if not rgb_as_latents:
            raise NotImplementedError("the VAE-encoding path (renders) is not re-derived")
        batch_size = rgb.shape[0]
        rgb_BCHW = rgb.permute(0, 3, 1, 2)
        F.interpolate(rgb_BCHW, (512, 512), mode="bilinear", align_corners=False)  # unused with rgb_as_latents
        latents = rgb
        t = torch.randint(self.min_step, self.max_step + 1, [batch_size], dtype=torch.long, device=self.device)
        target, _, _ = self.compute_grad_sdi(latents, t, text_embeddings)
        loss_sdi = 0.5 * F.mse_loss(latents, target.detach(), reduction="mean") / batch_size
        return {"loss_sdi": loss_sdi, "grad_norm": (latents - target).norm(), "min_step": self.min_step,
                "max_step": self.max_step, "t": t}

    def notebook_cache_kappa(self, x_T: torch.Tensor, prompt: str, n_steps: int, adam_eps: float = NOTEBOOK_ADAM_EPS):
        """The notebook's "Cache kappa" loop for ``steps 0 .. n_steps - 1`` from the init noise ``x_T``.

        ``adam_eps`` other than the notebook's 1e-8 only serves to show which part of a difference Adam's eps makes.
        Returns the init, the init's eps, and per step: the latent after the step, t and the current target."""
        emb = self.embeddings(prompt)
        latents_denoised, noise_pred = self.denoised_init(x_T, emb)
        out = {"init": latents_denoised.clone(), "init_eps": noise_pred.clone(), "latents": [], "t": [], "targets": []}
        latent = nn.Parameter(latents_denoised.clone())
        optimizer = torch.optim.Adam([latent], lr=NOTEBOOK_LR, weight_decay=0, eps=adam_eps)
        t_interval = NOTEBOOK_N_ITERS // NOTEBOOK_T_N_STEPS
        target, cur_t = None, None
        for step in range(n_steps):
            t = torch.tensor([self.anneal_t(step, NOTEBOOK_N_ITERS, NOTEBOOK_MIN_STEP_PERCENT,
                                            NOTEBOOK_MAX_STEP_PERCENT)])
            optimizer.zero_grad()
            if step % t_interval == 0:
                target, _, new_noise_pred = self.compute_grad_sdi(latent.detach(), t, emb,
                                                                   call_with_defined_noise=noise_pred)
                cur_t = t
            loss = 0.5 * F.mse_loss(latent, target.detach(), reduction="mean")
            loss.backward()
            optimizer.step()
            noise_pred = new_noise_pred  # guidance_output["noise_pred"]
            out["latents"].append(latent.detach().clone())
            out["t"].append(int(cur_t))
            out["targets"].append(target.clone())
        return out


# ---------------------------------------------------------------- the prompt processor
VIEWS = ("side", "front", "back", "overhead")  # threestudio's directions, in its order
FRONT_THRESHOLD, BACK_THRESHOLD, OVERHEAD_THRESHOLD = 45.0, 45.0, 60.0  # PromptProcessor.Config


def shift_azimuth_deg(azimuth: torch.Tensor) -> torch.Tensor:
    return (azimuth + 180) % 360 - 180


class PromptUtils:
    """``PromptProcessorOutput`` of one prompt with the default negative prompt "" (no Perp-Neg): the plain and the
    four view-dependent ``"<prompt>, <view> view"`` embeddings, encoded once."""

    def __init__(self, sd: DiffusersSD, prompt: str):
        self.text_embeddings, self.uncond_text_embeddings = sd.text(prompt), sd.text("")
        self.text_embeddings_vd = torch.cat([sd.text(f"{prompt}, {view} view") for view in VIEWS])
        self.uncond_text_embeddings_vd = torch.cat([sd.text("") for _ in VIEWS])
        self.conditions: list[Callable] = [
            lambda ele, azi, dis: torch.ones_like(ele, dtype=torch.bool),
            lambda ele, azi, dis: (shift_azimuth_deg(azi) > -FRONT_THRESHOLD) & (shift_azimuth_deg(azi) < FRONT_THRESHOLD),
            lambda ele, azi, dis: ((shift_azimuth_deg(azi) > 180 - BACK_THRESHOLD)
                                   | (shift_azimuth_deg(azi) < -180 + BACK_THRESHOLD)),
            lambda ele, azi, dis: ele > OVERHEAD_THRESHOLD,
        ]

    def get_text_embeddings(self, elevation, azimuth, camera_distances, view_dependent_prompting: bool = True):
        """``cat([cond, uncond])`` for the cameras: each camera's direction is the last of the views whose condition
        holds."""
        if view_dependent_prompting:
            direction_idx = torch.zeros_like(elevation, dtype=torch.long)
            for idx, condition in enumerate(self.conditions):
                direction_idx[condition(elevation, azimuth, camera_distances)] = idx
            text = self.text_embeddings_vd[direction_idx]
            uncond = self.uncond_text_embeddings_vd[direction_idx]
        else:
            text = self.text_embeddings.expand(elevation.shape[0], -1, -1)
            uncond = self.uncond_text_embeddings.expand(elevation.shape[0], -1, -1)
        return torch.cat([text, uncond], dim=0)


class CameraTexts:
    """The embeddings ``predict_noise`` asks the prompt processor for at each call, for fixed cameras."""

    def __init__(self, prompt_utils: PromptUtils, elevation, azimuth, camera_distances):
        self.prompt_utils, self.cameras = prompt_utils, (elevation, azimuth, camera_distances)

    def __call__(self) -> torch.Tensor:
        return self.prompt_utils.get_text_embeddings(*self.cameras)


# ---------------------------------------------------------------- the loop
class NotebookLoop:
    """The notebook's latent optimization with the guidance called on the latent at every step (``rgb_as_latents``;
    the inversion every step, as the 3D system calls the guidance on every render): ``update_step``, ``zero_grad``,
    the guidance, ``loss_sdi.backward()``, the Adam step. The notebook's camera (elevation 0, azimuth 0, distance 1)
    and denoised init. ``save_every``: a VAE decode written as a PNG (the notebook draws a matplotlib figure every 5
    steps instead; the benchmark gives every loop the same saving cadence)."""

    def __init__(self, guidance: OfficialSDI, prompt: str, x_T: torch.Tensor, save_every: int = 0,
                 save_dir: Path | None = None):
        self.guidance = guidance
        self.prompt_utils = PromptUtils(guidance, prompt)
        self.batch = dict(elevation=torch.Tensor([0]), azimuth=torch.Tensor([0]), camera_distances=torch.Tensor([1]))
        latents_denoised, _ = guidance.denoised_init(x_T, CameraTexts(self.prompt_utils, **self.batch))
        self.latent = nn.Parameter(latents_denoised)
        self.optimizer = torch.optim.Adam([self.latent], lr=NOTEBOOK_LR, weight_decay=NOTEBOOK_WEIGHT_DECAY)
        self.save_every, self.save_dir = save_every, save_dir

    def step(self, step: int) -> dict[str, Any]:
        g = self.guidance
        g.update_step(step)
        self.optimizer.zero_grad()
        out = g(self.latent, CameraTexts(self.prompt_utils, **self.batch), rgb_as_latents=True)
        out["loss_sdi"].backward()
        self.optimizer.step()
        if self.save_every and step % self.save_every == 0:
            with torch.no_grad():
                decoded = g.decode_latent(self.latent.detach().to(g.weights_dtype))
            save_png(decoded, Path(self.save_dir) / "debug_image.png")
        return out
