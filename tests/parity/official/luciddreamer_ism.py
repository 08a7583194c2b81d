"""LucidDreamer's ISM (``StableDiffusion.train_step``) re-derived on diffusers, with train.py's per-iteration work.

Official source read: EnVision-Research/LucidDreamer at commit ``2ecf0936617103107e4b20c34e94d204196f7a44``.

* ``guidance/sd_utils.py``:

  - ``StableDiffusion.__init__`` (l. 57-139): the pipeline in ``precision_t`` (fp16 with ``fp16``), the
    ``DDIMScheduler`` with ``set_timesteps(1000)`` and ``self.timesteps = flip(scheduler.timesteps)``, i.e.
    1, 2, ..., 1000 (SD 2.1's ``steps_offset`` 1, "leading" spacing), so index i is timestep i + 1;
    ``min_step = int(1000 t_range[0])``, ``max_step = int(1000 t_range[1])``, ``warmup_step = int(1000 (max_t_range -
    t_range[1]))``; ``self.alphas = scheduler.alphas_cumprod``; ``noise_gen``, a generator seeded with ``noise_seed``.
  - ``add_noise_with_cfg`` (l. 159-215): unless ``is_noisy_latent``, x0 is first noised with the step's noise to
    ``timesteps[ind_prev_t]`` (its second index argument, the START); then at most ``inv_steps`` times:
    ``scale_model_input``, the UNet at ``timesteps[cur_ind_t]`` (with ``cfg <= 1`` only on the second half of the
    inversion embeddings), ``next_ind_t = min(cur_ind_t + delta_t, ind_t)``, one ``ddim_step`` from
    ``timesteps[cur]`` to ``timesteps[next]`` (passed as ``-delta_t_``), ``torch.cuda.empty_cache()``, stop when
    ``ind_t`` is reached; returns the predictions newest first.
  - ``train_step`` (l. 346-466): the random flip and the VAE encoding of the renders; noise ``randn(generator=
    noise_gen) + 0.1 randn(1, 4, 1, 1)`` repeated over the batch (l. 362-368); ``current_delta_t = int(delta_t +
    warm_up_rate (delta_t_start - delta_t))`` (l. 375-378); ``ind_t = randint(min_step, max_step + int(warmup_step
    warm_up_rate), (1,), generator=noise_gen)`` (one for the batch), ``ind_prev_t = max(ind_t - current_delta_t, 0)``
    (l. 380-381); under ``no_grad``, step 1 inverts from ``starting_ind = max(ind_prev_t - xs_delta_t xs_inv_steps,
    0)`` to ``ind_prev_t`` in strides ``xs_delta_t``, step 2 one stride ``current_delta_t`` to ``ind_t`` from the noisy
    x_s; ``target = pred_scores[0][1]``, the prediction at (x_s, s) (l. 393-405); the target UNet call on ``[uncond
    (negative), text]`` at ``t = timesteps[ind_t]`` and ``pred_noise = uncond + guidance_scale (text - uncond)``
    (l. 408-432); ``w = sqrt((1 - alphas[t]) / alphas[t])``; ``grad = nan_to_num(grad_scale w (pred_noise -
    target))`` (l. 434-438), returned as ``SpecifyGradient.apply(latents, grad)`` (a dummy loss whose backward hands
    ``grad`` to the latents); a visualization every ``vis_interval`` (100) iterations.
  - ``train_step_perpneg`` (l. 224-343): the same, but ``current_delta_t = int(delta_t + ceil(warm_up_rate
    (delta_t_start - delta_t)))`` (l. 250) and the Perp-Neg target.
* ``guidance/sd_step.py`` ``ddim_step`` (l. 62-202): ``prev_timestep = timestep - delta_timestep``; ``variance =
  |_get_variance(timestep, prev_timestep)|``, ``std_dev_t = min((1 - a_prev) / 2, eta variance) ** 0.5`` (0 at
  eta 0); ``prev = sqrt(a_prev) (x - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev - std^2) eps``, then
  ``nan_to_num``.
* ``train.py``: ``embeddings`` encoded once (``uncond`` = the negative prompt, ``inverse_text``, the view texts);
  per iteration ``text_z_inverse = cat([uncond, inverse_text])``, each camera's ``text_z = cat([uncond, its
  text])`` stacked on dim 1, ``warm_up_rate = 1 - min(iteration / warmup_iter, 1)`` for iterations 1, 2, ...,
  ``grad_scale = lambda_guidance``; then ``loss.backward()``, the optimizer step and ``zero_grad(set_to_none=True)``.
* ``guidance/perpneg_utils.py`` and train.py's ``get_pos_neg_text_embeddings`` (l. 40-107): the Perp-Neg views.
* ``arguments/__init__.py`` ``GuidanceParams`` (l. 57-109) and ``OptimizationParams`` (l. 148-202); ``configs/*.yaml``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tests.parity.official.pipeline import DiffusersSD, ModelSource, save_png

# ---------------------------------------------------------------- constants typed from the official code
# arguments/__init__.py GuidanceParams (code defaults) and what every configs/*.yaml sets alike
OFFICIAL_T_RANGE = (0.02, 0.5)  # t_range (l. 76; every config)
OFFICIAL_MAX_T_RANGE = 0.98  # max_t_range (l. 77; every config)
OFFICIAL_DELTA_T = 80  # delta_t (l. 87)
OFFICIAL_DELTA_T_START = 100  # delta_t_start (l. 88; every config)
OFFICIAL_ANNEALING_INTERVALS = True  # annealing_intervals (l. 89; every config)
OFFICIAL_INVERSE_TEXT = ""  # inverse_text (l. 91; every config)
OFFICIAL_NEGATIVE = ""  # negative (l. 95; every config sets its own)
OFFICIAL_GUIDANCE_SCALE = 7.5  # guidance_scale (l. 96; every config)
OFFICIAL_DENOISE_GUIDANCE_SCALE = 1.0  # denoise_guidance_scale (l. 97; every config): no CFG in the inversion
OFFICIAL_LAMBDA_GUIDANCE = 0.1  # lambda_guidance: every config (the code default, l. 98, is 1.)
OFFICIAL_XS_DELTA_T = 200  # xs_delta_t (l. 100; every config)
OFFICIAL_XS_INV_STEPS = 5  # xs_inv_steps (l. 101; every config)
OFFICIAL_XS_ETA = 0.0  # xs_eta (l. 102; every config)
OFFICIAL_NOISE_OFFSET = 0.1  # sd_utils.py l. 368: + 0.1 * torch.randn((1, 4, 1, 1)).repeat(B, 1, 1, 1)
OFFICIAL_ITERATIONS = 5000  # OptimizationParams.iterations (l. 150; every config)
OFFICIAL_WARMUP_ITER = 1500  # OptimizationParams.warmup_iter (l. 189; every config)
OFFICIAL_C_BATCH_SIZE = 4  # every config (the code default, l. 105, is 1)
OFFICIAL_RESOLUTION = 512  # GenerateCamParams.image_w / image_h
OFFICIAL_FLIP_P = 0.5  # sd_utils.py StableDiffusion.augmentation: T.RandomHorizontalFlip(p=0.5)

OFFICIAL_VIS_INTERVAL = 100  # vis_interval (l. 107)


# ---------------------------------------------------------------- the official formulas, re-derived
def official_warm_up_rate(iteration: int) -> float:
    """train.py: ``warm_up_rate = 1. - min(iteration / opt.warmup_iter, 1.)``."""
    return 1.0 - min(iteration / OFFICIAL_WARMUP_ITER, 1.0)


def official_current_delta_t(warm_up_rate: float, delta_t: int, perpneg: bool) -> int:
    """train_step (l. 375-378) or train_step_perpneg (l. 249-252), annealing_intervals on."""
    if perpneg:
        return int(delta_t + np.ceil(warm_up_rate * (OFFICIAL_DELTA_T_START - delta_t)))
    return int(delta_t + warm_up_rate * (OFFICIAL_DELTA_T_START - delta_t))


class SpecifyGradient(torch.autograd.Function):
    """sd_utils.py's dummy loss: forward returns ones(1); backward hands the saved gradient (times the incoming
    scale) to the input."""

    @staticmethod
    def forward(ctx, input_tensor, gt_grad):
        ctx.save_for_backward(gt_grad)
        return torch.ones([1], device=input_tensor.device, dtype=input_tensor.dtype)

    @staticmethod
    def backward(ctx, grad_scale):
        (gt_grad,) = ctx.saved_tensors
        return gt_grad * grad_scale, None


class OfficialISM(DiffusersSD):
    """LucidDreamer's ``StableDiffusion`` ISM on a diffusers model, from the latents on (no VAE encoding, no flips).
    ``precision_t``: the UNet's dtype (fp16 with the official ``fp16`` option)."""

    def __init__(self, source: ModelSource, device: torch.device | str = "cpu", precision_t=torch.float32,
                 noise_seed: int = 0):
        from diffusers import DDIMScheduler

        super().__init__(source, device, precision_t)
        self.precision_t = precision_t
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        assert self.scheduler.config.prediction_type == "epsilon" and not self.scheduler.config.thresholding
        assert not self.scheduler.config.clip_sample
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.scheduler.set_timesteps(self.num_train_timesteps, device=self.device)
        self.timesteps = torch.flip(self.scheduler.timesteps, dims=(0,))
        self.min_step = int(self.num_train_timesteps * OFFICIAL_T_RANGE[0])
        self.max_step = int(self.num_train_timesteps * OFFICIAL_T_RANGE[1])
        self.warmup_step = int(self.num_train_timesteps * (OFFICIAL_MAX_T_RANGE - OFFICIAL_T_RANGE[1]))
        self.noise_gen = torch.Generator(self.device)
        self.noise_gen.manual_seed(noise_seed)
        self.alphas = self.scheduler.alphas_cumprod.to(self.device)
        self.last: dict[str, int] = {}  # the last train_step's ind_t and ind_prev_t

    def get_text_embeds(self, prompt) -> torch.Tensor:
        return self.text(prompt)

    def ind_t_bounds(self, warm_up_rate: float) -> tuple[int, int]:
        """``torch.randint(low, high)``'s arguments for ind_t (high exclusive)."""
        return self.min_step, self.max_step + int(self.warmup_step * warm_up_rate)

    def ddim_step(self, model_output, timestep, sample, delta_timestep, eta: float = 0.0):
        """sd_step.ddim_step for an epsilon model without clipping (eta 0 in every official config: no noise)."""
        sch = self.scheduler
        prev_timestep = timestep - delta_timestep
        alpha_prod_t = sch.alphas_cumprod[timestep]
        alpha_prod_t_prev = sch.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sch.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        variance = abs(sch._get_variance(timestep, prev_timestep))
        std_dev_t = min((1 - alpha_prod_t_prev) / 2, eta * variance) ** 0.5
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * model_output
        assert eta == 0, "the configs' xs_eta is 0"
        return torch.nan_to_num(alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction)

    @torch.no_grad()
    def add_noise_with_cfg(self, latents, noise, ind_t, ind_prev_t, text_embeddings, cfg, delta_t, inv_steps,
                           is_noisy_latent=False, evaluated=None):
        assert cfg <= 1.0  # denoise_guidance_scale 1.0 in every config
        text_embeddings = text_embeddings.to(self.precision_t)
        uncond_text_embedding = text_embeddings.reshape(2, -1, *text_embeddings.shape[-2:])[1]
        if is_noisy_latent:
            prev_noisy_lat = latents
        else:
            prev_noisy_lat = self.scheduler.add_noise(latents, noise, self.timesteps[ind_prev_t])
        cur_ind_t, cur_noisy_lat, pred_scores = ind_prev_t, prev_noisy_lat, []
        for _ in range(inv_steps):
            cur_noisy_lat_ = self.scheduler.scale_model_input(cur_noisy_lat, self.timesteps[cur_ind_t]).to(
                self.precision_t)
            timestep_model_input = self.timesteps[cur_ind_t].reshape(1, 1).repeat(cur_noisy_lat_.shape[0], 1).reshape(-1)
            unet_output = self.unet(cur_noisy_lat_, timestep_model_input,
                                    encoder_hidden_states=uncond_text_embedding).sample
            if evaluated is not None:
                evaluated.append(int(self.timesteps[cur_ind_t]))
            pred_scores.append((cur_ind_t, unet_output))
            next_ind_t = min(cur_ind_t + delta_t, ind_t)
            cur_t, next_t = self.timesteps[cur_ind_t], self.timesteps[next_ind_t]
            delta_t_ = next_t - cur_t  # a DDIMScheduler
            cur_noisy_lat = self.ddim_step(unet_output, cur_t, cur_noisy_lat, -delta_t_)
            cur_ind_t = next_ind_t
            del unet_output
            torch.cuda.empty_cache()
            if cur_ind_t == ind_t:
                break
        return prev_noisy_lat, cur_noisy_lat, pred_scores[::-1]

    def view_text_z(self, prompt, azimuth, perpneg):
        """train.py for one camera at ``delta_azimuth`` = ``azimuth``: without perpneg the interpolated embedding
        ``r start_z + (1 - r) end_z`` of its plain branch (l. 257-271); with perpneg ``adjust_text_embeddings`` ->
        ``get_pos_neg_text_embeddings`` (l. 40-107): ``[pos_z, neg_1, neg_2]`` and the weights ``[1, w_1, w_2]``
        (GuidanceParams negative_w -2, front_decay_factor 2, side_decay_factor 10)."""
        emb = {d: self.get_text_embeds([f"{prompt}, {d} view"]) for d in ("front", "side", "back")}
        if -90 <= azimuth < 90:
            r = 1 - azimuth / 90 if azimuth >= 0 else 1 + azimuth / 90
            start_z, end_z = emb["front"], emb["side"]
        else:
            r = 1 - (azimuth - 90) / 90 if azimuth >= 0 else 1 + (azimuth + 90) / 90
            start_z, end_z = emb["side"], emb["back"]
        pos_z = r * start_z + (1 - r) * end_z
        if not perpneg:
            return pos_z, None
        negative_w, front_decay_factor, side_decay_factor = -2.0, 2.0, 10.0
        if -90 <= azimuth < 90:
            front_neg_w = 0.0 if r > 0.8 else math.exp(-r * front_decay_factor) * negative_w
            side_neg_w = 0.0 if r < 0.2 else math.exp(-(1 - r) * side_decay_factor) * negative_w
            return torch.cat([pos_z, emb["front"], emb["side"]]), torch.tensor([1.0, front_neg_w, side_neg_w])
        front_neg_w = negative_w
        side_neg_w = 0.0 if r > 0.8 else math.exp(-r * side_decay_factor) * negative_w / 2
        return torch.cat([pos_z, emb["side"], emb["front"]]), torch.tensor([1.0, side_neg_w, front_neg_w])

    @staticmethod
    def weighted_perpendicular_aggregator(delta_noise_preds, weights, batch_size):
        """perpneg_utils.py: ``main + sum_i w_i perp(delta_i, main)`` over the cameras whose |w_i| > 1e-4."""
        def perpendicular(x, y):
            return x - ((torch.mul(x, y).sum()) / max(torch.norm(y) ** 2, 1e-6)) * y

        deltas, ws = delta_noise_preds.split(batch_size, dim=0), weights.split(batch_size, dim=0)
        assert torch.all(ws[0] == 1.0)
        main = deltas[0]
        acc = torch.zeros_like(main)
        for comp, w in zip(deltas[1:], ws[1:]):
            for b in range(batch_size):
                if abs(float(w[b])) > 1e-4:
                    acc[b] += w[b] * perpendicular(comp[b], main[b])
        return acc + main

    def train_step(self, text_embeddings, latents, warm_up_rate, embedding_inverse, grad_scale=1.0,
                   delta_t=OFFICIAL_DELTA_T, perpneg=False, weights=None, ind_t=None, noise=None, evaluated=None):
        """``train_step`` (``train_step_perpneg`` when ``perpneg``) from the latents on: ``text_embeddings`` as
        train.py stacks them (``(1 + K, B, 77, D)``: the negative prompt's, then each camera's K texts),
        ``embedding_inverse`` = ``cat([uncond, inverse_text])``, ``weights`` the Perp-Neg weights ``(K, B)``.
        ``ind_t`` (an int) and ``noise`` are drawn from ``noise_gen`` unless given. Returns SpecifyGradient's dummy
        loss; :attr:`last` holds the gradient, ``t`` and the indices."""
        B = latents.shape[0]
        K = text_embeddings.shape[0] - 1
        shape = (B, *latents.shape[1:])
        if noise is None:
            noise = (torch.randn(shape, dtype=latents.dtype, device=latents.device, generator=self.noise_gen)
                     + OFFICIAL_NOISE_OFFSET * torch.randn((1, shape[1], 1, 1), device=latents.device).repeat(B, 1, 1, 1))
        text_embeddings = text_embeddings.reshape(-1, *text_embeddings.shape[-2:])
        inverse_text_embeddings = embedding_inverse.unsqueeze(1).repeat(1, B, 1, 1).reshape(
            -1, *embedding_inverse.shape[-2:])
        current_delta_t = official_current_delta_t(warm_up_rate, delta_t, perpneg=perpneg)
        drawn = torch.randint(*self.ind_t_bounds(warm_up_rate), (1,), dtype=torch.long, generator=self.noise_gen,
                              device=self.device)[0]
        ind_t = drawn if ind_t is None else torch.tensor(ind_t, device=self.device)
        ind_prev_t = max(ind_t - current_delta_t, torch.ones_like(ind_t) * 0)
        t = self.timesteps[ind_t]
        with torch.no_grad():  # ISM: step 1, x_s with larger steps; step 2, x_t
            xs_delta_t, xs_inv_steps = OFFICIAL_XS_DELTA_T, OFFICIAL_XS_INV_STEPS
            starting_ind = max(ind_prev_t - xs_delta_t * xs_inv_steps, torch.ones_like(ind_t) * 0)
            _, prev_latents_noisy, pred_scores_xs = self.add_noise_with_cfg(
                latents, noise, ind_prev_t, starting_ind, inverse_text_embeddings, OFFICIAL_DENOISE_GUIDANCE_SCALE,
                xs_delta_t, xs_inv_steps, evaluated=evaluated)
            _, latents_noisy, pred_scores_xt = self.add_noise_with_cfg(
                prev_latents_noisy, noise, ind_t, ind_prev_t, inverse_text_embeddings, OFFICIAL_DENOISE_GUIDANCE_SCALE,
                current_delta_t, 1, is_noisy_latent=True, evaluated=evaluated)
            pred_scores = pred_scores_xt + pred_scores_xs
            target = pred_scores[0][1]
        with torch.no_grad():
            latent_model_input = latents_noisy[None].repeat(1 + K, 1, 1, 1, 1).reshape(-1, *latents.shape[1:])
            tt = t.reshape(1, 1).repeat(latent_model_input.shape[0], 1).reshape(-1)
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, tt[0])
            unet_output = self.unet(latent_model_input.to(self.precision_t), tt.to(self.precision_t),
                                    encoder_hidden_states=text_embeddings.to(self.precision_t)).sample
            unet_output = unet_output.reshape(1 + K, -1, *latents.shape[1:])
            noise_pred_uncond = unet_output[:1].reshape(-1, *latents.shape[1:])
            noise_pred_text = unet_output[1:].reshape(-1, *latents.shape[1:])
            if perpneg:  # train.py: weights stacked on dim 1 ([K, B]) and flattened, K-major as the predictions
                delta_noise_preds = noise_pred_text - noise_pred_uncond.repeat(K, 1, 1, 1)
                delta_dsd = self.weighted_perpendicular_aggregator(delta_noise_preds, weights.reshape(-1), B)
            else:
                delta_dsd = noise_pred_text - noise_pred_uncond
        pred_noise = noise_pred_uncond + OFFICIAL_GUIDANCE_SCALE * delta_dsd
        w = ((1 - self.alphas[t]) / self.alphas[t]) ** 0.5
        grad = w * (pred_noise - target)
        grad = torch.nan_to_num(grad_scale * grad)
        self.last = {"grad": grad, "t": int(t), "ind_t": int(ind_t), "ind_prev_t": int(ind_prev_t)}
        return SpecifyGradient.apply(latents, grad)

    def grad_for(self, latents, prompts, negative, ind_t, noise, warm_up_rate, delta_t=OFFICIAL_DELTA_T,
                 lambda_guidance=OFFICIAL_LAMBDA_GUIDANCE, evaluated=None, azimuths=None, perpneg=False):
        """The gradient :meth:`train_step` hands to ``latents`` and ``t``, for the prompts (each camera's text_z as
        train.py builds it: :meth:`view_text_z` at ``azimuths``, else the prompt's own embedding), with ``ind_t``
        and ``noise`` given."""
        uncond = self.get_text_embeds([negative])
        if azimuths is None:
            cond = [(self.get_text_embeds([p]), None) for p in prompts]
        else:
            cond = [self.view_text_z(p, a, perpneg) for p, a in zip(prompts, azimuths)]
        text_embeddings = torch.stack([torch.cat([uncond, c]) for c, _ in cond], dim=1)
        weights = torch.stack([w for _, w in cond], dim=1) if perpneg else None
        embedding_inverse = torch.cat([uncond, self.get_text_embeds(OFFICIAL_INVERSE_TEXT)], dim=0)
        self.train_step(text_embeddings, latents, warm_up_rate, embedding_inverse, lambda_guidance, delta_t,
                        perpneg, weights, ind_t=ind_t, noise=noise, evaluated=evaluated)
        return self.last["grad"], self.last["t"]


# ---------------------------------------------------------------- train.py's iteration, for an optimized latent
class LatentLoop:
    """train.py's per-iteration work around ``train_step`` with one optimized latent (batch 1) in place of the
    Gaussians and their renders: ``text_z_inverse``, the camera's ``text_z = cat([uncond, text])`` (no views: the
    prompt's own embedding), ``warm_up_rate`` of iteration ``step + 1``, ``train_step``, ``loss.backward()``, the
    optimizer step and ``zero_grad(set_to_none=True)``. Not re-derived: the renders' flip and VAE encoding (a latent
    target has neither) and the visualization every ``vis_interval`` iterations (``save_every`` writes a VAE decode
    as a PNG instead). ``optimizer``: AdamW keyword arguments for the latent (LucidDreamer has no 2D loop)."""

    def __init__(self, guidance: OfficialISM, prompt: str, latent0: torch.Tensor, optimizer: dict,
                 negative: str = OFFICIAL_NEGATIVE, save_every: int = 0, save_dir: Path | None = None):
        self.guidance = guidance
        self.embeddings = {"uncond": guidance.get_text_embeds([negative]),
                           "inverse_text": guidance.get_text_embeds([OFFICIAL_INVERSE_TEXT]),
                           "text": guidance.get_text_embeds([prompt])}
        self.latent = torch.nn.Parameter(latent0.clone().to(guidance.device))
        self.optimizer = torch.optim.AdamW([self.latent], **optimizer)
        self.save_every, self.save_dir = save_every, save_dir

    def step(self, step: int, ind_t: int | None = None) -> dict:
        g, emb = self.guidance, self.embeddings
        iteration = step + 1
        text_z_inverse = torch.cat([emb["uncond"], emb["inverse_text"]], dim=0)
        text_z_ = [torch.cat([emb["uncond"], emb["text"]], dim=0)]
        warm_up_rate = 1.0 - min(iteration / OFFICIAL_WARMUP_ITER, 1.0)
        loss = g.train_step(torch.stack(text_z_, dim=1), self.latent.to(g.precision_t), warm_up_rate, text_z_inverse,
                            grad_scale=OFFICIAL_LAMBDA_GUIDANCE, ind_t=ind_t)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.save_every and step % self.save_every == 0:
            with torch.no_grad():
                decoded = g.decode_latent(self.latent.detach().to(g.precision_t))
            save_png(decoded, Path(self.save_dir) / "debug_image.png")
        return g.last
