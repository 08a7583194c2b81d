"""davidmcall/SDS-Bridge ``2D_experiments`` (the Bridge paper's 2D code) re-derived on diffusers, with its loop.

Official sources read (commit ``240e06e511c7c5813dc9caf5d14f54237beaa992``):

* ``2D_experiments/guidance.py``: ``GuidanceConfig`` (500 DDIM inference steps, t ratios [0.02, 0.98], the LoRA base
  ``stabilityai/stable-diffusion-2-1``, ``guidance_scale_lora = 1``, ``lora_n_timestamp_samples = 1``,
  ``lora_cfg_training``); ``Guidance.__init__`` (the pipeline, ``DDIMScheduler.from_config`` with
  ``set_timesteps(500)``, frozen modules, the text features of the empty source and target prompts and of ``""``;
  with ``use_lora`` a second pipeline whose UNet gets the camera embedding ``TimestepEmbedding(16, 1280)`` as its
  ``class_embedding`` and diffusers' ``LoRAAttnProcessor`` on every attention); ``update_text_features`` (one cached
  source and one cached target feature, encoded again whenever the prompt differs from the cached one);
  ``sample_timestep`` (``set_timesteps(500)`` on every call, the reversed grid, an index ``randint(int(500 * 0.02),
  int(500 * 0.98))``); ``sds_loss``, ``bridge_stage_two`` (the UNet called with autograd on: the image requires
  grad and nothing is under ``no_grad``), ``nfsd_loss`` (two ``no_grad`` UNet calls of two conditionings, the target
  feature switched to the negative prompt in between, so both prompts are encoded again at every step),
  ``vsd_loss`` and ``train_lora``; every loss returns ``grad`` next to ``0.5 * mse(im, (im - grad).detach()) / B``.
* ``2D_experiments/generate.py``: the arguments (prompt "a DSLR photo of a dolphin", cfg 40, lr 0.01, 1000 steps,
  stage two from step 500), the latent ``randn(1, 4, 64, 64)``, ``AdamW([im], lr, betas=(0.9, 0.99), eps=1e-15)``,
  the LoRA's ``AdamW([{"params": unet_lora.parameters(), "lr": 3e-4}], weight_decay=0)``, and the loop: the mode's
  loss (VSD with ``cfg_scale=7.5``, then ``lora_loss.backward()``, LoRA step), ``im.backward(gradient=grad)``, the
  image step, and every 10 steps a VAE decode written as a PNG (every 100 steps an mp4 of all decodes so far).

CSD (not in this repository) is CVMI-Lab/Classifier-Score-Distillation at commit
``5c65ca78517202efdf5ffb2de28a5e5eadbf76f4``, ``threestudio/models/guidance/stable_diffusion_triple_guidance.py``
``compute_grad_sds``: ``w (cond_scale eps_text + uncond_scale eps_neg + null_scale eps_null + noise_scale noise)``.

The LoRA layers are re-written (:class:`RefLoRALinear`: diffusers' ``LoRAAttnProcessor`` computes
``W x + up(down(x))`` on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``; the processor class is gone from current
diffusers). Draws (t, noise, the LoRA's t, noise and dropout) can be given to every loss; otherwise they are drawn as
the official code draws them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.parity.official.pipeline import DiffusersSD, ModelSource, load_unet, save_png

# ---------------------------------------------------------------- constants typed from the official code
OFFICIAL_PROMPT = "a DSLR photo of a dolphin"  # generate.py --prompt
OFFICIAL_CFG_SCALE = 40.0  # generate.py --cfg_scale (passed to sds_loss, bridge_stage_two and nfsd_loss)
OFFICIAL_LR = 0.01  # generate.py --lr
OFFICIAL_N_STEPS = 1000  # generate.py --n_steps
OFFICIAL_STAGE_TWO_START = 500  # generate.py --stage_two_start_step
OFFICIAL_SAVE_EVERY = 10  # generate.py: decode and write debug_image.png when step % 10 == 0
OFFICIAL_NUM_INFERENCE_STEPS = 500  # guidance.py GuidanceConfig.num_inference_steps
OFFICIAL_MIN_STEP_RATIO = 0.02  # guidance.py GuidanceConfig.min_step_ratio
OFFICIAL_MAX_STEP_RATIO = 0.98  # guidance.py GuidanceConfig.max_step_ratio
OFFICIAL_NFSD_SWITCH_T = 200  # guidance.py nfsd_loss: `if t < 200`
OFFICIAL_EXTRA_TGT = ", detailed high resolution, high quality, sharp"  # bridge_stage_two / generate.py default
OFFICIAL_EXTRA_SRC = (
    ", oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"
)
OFFICIAL_NFSD_NEGATIVE = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)
# VSD (vsd_loss, train_lora, generate.py)
OFFICIAL_LORA_MODEL = "stabilityai/stable-diffusion-2-1"  # both VSD codes' LoRA base (v-prediction)
OFFICIAL_CFG = 7.5  # generate.py vsd_loss(cfg_scale=7.5); prolificdreamer.yaml guidance_scale
OFFICIAL_CFG_LORA = 1.0  # guidance_scale_lora
OFFICIAL_T_MIN, OFFICIAL_T_MAX = 20, 980  # vsd_loss randint(20, 980 + 1); 3D int(1000 * 0.02), int(1000 * 0.98)
OFFICIAL_LORA_T = (0, 1000)  # train_lora randint(int(1000 * 0.0), int(1000 * 1.0))
OFFICIAL_DROPOUT = 0.1  # train_lora: `< 0.1` -> camera_condition zeros (whole batch; text kept)
OFFICIAL_RANK = 4  # LoRAAttnProcessor's default rank
OFFICIAL_CAMERA_DIM = 16  # TimestepEmbedding(16, 1280): a flattened 4x4 c2w
IM_ADAMW = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-15)  # generate.py l. 92 (weight decay: torch's 0.01)
LORA_ADAMW_2D = dict(lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # generate.py l. 93-99
MODES = ("bridge", "sds", "nfsd", "vsd")  # generate.py --mode


class Official2D(DiffusersSD):
    """``Guidance`` of ``2D_experiments/guidance.py`` (without LoRA) on a diffusers model.

    The losses take one image ``im`` (1, 4, h, w) and one prompt, draw ``t`` and the noise as the official code does
    unless they are given, and return ``{"loss", "grad", "t"}``: the official loop applies ``grad`` with
    ``im.backward(gradient=grad)``. The short forms :meth:`sds`, :meth:`bridge_stage_two`, :meth:`nfsd` return the
    gradient for a given t and noise at the 2D scale.
    """

    def __init__(self, source: ModelSource, device: torch.device | str = "cpu"):
        from diffusers import DDIMScheduler

        super().__init__(source, device)
        self.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.scheduler.set_timesteps(OFFICIAL_NUM_INFERENCE_STEPS)
        self.pipe.scheduler = self.scheduler
        self.guidance_scale = 30.0  # GuidanceConfig.guidance_scale (generate.py sets it to --cfg_scale every step)
        self.src_text_feature: torch.Tensor | None = None
        self.tgt_text_feature: torch.Tensor | None = None
        self.update_text_features(src_prompt="", tgt_prompt="")  # GuidanceConfig's empty source / target prompts
        self.null_text_feature = self.text("")

    # -- text: one cached source feature, one cached target feature
    def update_text_features(self, src_prompt: str | None = None, tgt_prompt: str | None = None) -> None:
        """Encode a prompt again only when it differs from the cached one of its slot."""
        if src_prompt is not None and (self.src_text_feature is None or src_prompt != self.src_prompt):
            self.src_prompt, self.src_text_feature = src_prompt, self.text(src_prompt)
        if tgt_prompt is not None and (self.tgt_text_feature is None or tgt_prompt != self.tgt_prompt):
            self.tgt_prompt, self.tgt_text_feature = tgt_prompt, self.text(tgt_prompt)

    # -- t and the surrogate loss
    @staticmethod
    def timestep_bounds(n: int) -> tuple[int, int]:
        """``randint``'s arguments for the index into the reversed grid of ``n`` timesteps (high exclusive)."""
        lo = 1 if OFFICIAL_MIN_STEP_RATIO <= 0 else int(n * OFFICIAL_MIN_STEP_RATIO)
        hi = n if OFFICIAL_MAX_STEP_RATIO >= 1 else int(n * OFFICIAL_MAX_STEP_RATIO)
        return lo, max(hi, lo + 1)

    def sample_timestep(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, t_prev)``: t uniform on the reversed 500-step DDIM grid, the grid set again at every call."""
        self.scheduler.set_timesteps(OFFICIAL_NUM_INFERENCE_STEPS)
        timesteps = reversed(self.scheduler.timesteps)
        idx = torch.randint(*self.timestep_bounds(len(timesteps)), [batch_size], dtype=torch.long, device="cpu")
        return timesteps[idx].cpu(), timesteps[idx - 1].cpu()

    @staticmethod
    def loss_dict(im: torch.Tensor, grad: torch.Tensor, t: torch.Tensor, **extra) -> dict:
        target = (im - grad).detach()
        loss = 0.5 * F.mse_loss(im, target, reduction="mean") / im.shape[0]
        return {"loss": loss, "grad": grad, "t": t, **extra}

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.scheduler.alphas_cumprod[t]).to(self.device)

    def unet_pair(self, latents_noisy: torch.Tensor, t: torch.Tensor, first: torch.Tensor, second: torch.Tensor):
        """One UNet call on ``[x_t, x_t]`` with the text features ``[first, second]`` (autograd as the caller has it)."""
        out = self.unet.forward(torch.cat([latents_noisy] * 2, dim=0), torch.cat([t] * 2).to(self.device),
                                encoder_hidden_states=torch.cat([first, second], dim=0)).sample
        return out.chunk(2)

    @torch.no_grad()
    def unet_on(self, x_t: torch.Tensor, t: torch.Tensor, *embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One ``no_grad`` UNet call on x_t repeated for each text embedding (CSD and the 3D code batch k of them)."""
        k = len(embeddings)
        out = self.unet(torch.cat([x_t] * k), torch.cat([t] * k), encoder_hidden_states=torch.cat(embeddings)).sample
        return out.chunk(k)

    # -- the losses
    def sds_loss(self, im, prompt, cfg_scale=100.0, t=None, noise=None) -> dict:
        self.update_text_features(tgt_prompt=prompt)
        drawn, _ = self.sample_timestep(im.shape[0])
        t = drawn if t is None else t
        noise = torch.randn_like(im) if noise is None else noise
        latents_noisy = self.scheduler.add_noise(im, noise, t)
        e_text, e_uncond = self.unet_pair(latents_noisy, t, self.tgt_text_feature, self.null_text_feature)
        noise_pred = e_uncond + cfg_scale * (e_text - e_uncond)
        return self.loss_dict(im, torch.nan_to_num(self.weight(t) * (noise_pred - noise)), t)

    def bridge_stage_two_loss(self, im, prompt, cfg_scale=30.0, t=None, noise=None) -> dict:
        self.update_text_features(tgt_prompt=prompt + OFFICIAL_EXTRA_TGT, src_prompt=prompt + OFFICIAL_EXTRA_SRC)
        drawn, _ = self.sample_timestep(im.shape[0])
        t = drawn if t is None else t
        noise = torch.randn_like(im) if noise is None else noise
        latents_noisy = self.scheduler.add_noise(im, noise, t)
        e_tgt, e_src = self.unet_pair(latents_noisy, t, self.tgt_text_feature, self.src_text_feature)
        return self.loss_dict(im, torch.nan_to_num(self.weight(t) * cfg_scale * (e_tgt - e_src)), t)

    def nfsd_loss(self, im, prompt, cfg_scale=100.0, t=None, noise=None, branch: str | None = None) -> dict:
        """``branch`` forces "low" (delta_D = eps_u) or "high" (eps_u - eps_neg); None follows the official switch."""
        drawn, _ = self.sample_timestep(im.shape[0])
        t = drawn if t is None else t
        noise = torch.randn_like(im) if noise is None else noise
        latents_noisy = self.scheduler.add_noise(im, noise, t)
        self.update_text_features(tgt_prompt=prompt)
        with torch.no_grad():
            e_text, e_uncond = self.unet_pair(latents_noisy, t, self.tgt_text_feature, self.null_text_feature)
            delta_c = cfg_scale * (e_text - e_uncond)
        self.update_text_features(tgt_prompt=OFFICIAL_NFSD_NEGATIVE)
        with torch.no_grad():
            e_neg, _ = self.unet_pair(latents_noisy, t, self.tgt_text_feature, self.null_text_feature)
        low = bool(t < OFFICIAL_NFSD_SWITCH_T) if branch is None else branch == "low"
        delta_d = e_uncond if low else e_uncond - e_neg
        return self.loss_dict(im, torch.nan_to_num(self.weight(t) * (delta_c + delta_d)), t)

    # -- the gradients for a given t and noise (the parity tests' short forms)
    def sds(self, im, prompt, t, noise, cfg_scale=OFFICIAL_CFG_SCALE):
        return self.sds_loss(im, prompt, cfg_scale, t=t, noise=noise)["grad"]

    def bridge_stage_two(self, im, prompt, t, noise, cfg_scale=OFFICIAL_CFG_SCALE):
        return self.bridge_stage_two_loss(im, prompt, cfg_scale, t=t, noise=noise)["grad"]

    def bridge(self, im, prompt, t, noise, step):
        """generate.py's mode=bridge: SDS while ``step < stage_two_start_step``, then stage two."""
        if step < OFFICIAL_STAGE_TWO_START:
            return self.sds(im, prompt, t, noise)
        return self.bridge_stage_two(im, prompt, t, noise)

    def nfsd(self, im, prompt, t, noise, cfg_scale=OFFICIAL_CFG_SCALE, branch: str | None = None):
        return self.nfsd_loss(im, prompt, cfg_scale, t=t, noise=noise, branch=branch)["grad"]

    def csd(self, im, prompt, t, noise, cond_scale, uncond_scale, null_scale, noise_scale, negative):
        """CVMI-Lab's ``compute_grad_sds``: one call on [text, uncond (the negative prompt), null ("")]."""
        x_t = self.scheduler.add_noise(im, noise, t)
        e_text, e_neg, e_null = self.unet_on(x_t, t, self.text(prompt), self.text(negative), self.null_text_feature)
        combo = cond_scale * e_text + uncond_scale * e_neg + null_scale * e_null + noise_scale * noise
        return torch.nan_to_num(self.weight(t) * combo)


def official_timestep_support(scheduler) -> torch.Tensor:
    """The values ``Guidance.sample_timestep`` can return (each equally likely): reversed DDIM timesteps at indices
    ``randint(min_step, max_step)``."""
    scheduler.set_timesteps(OFFICIAL_NUM_INFERENCE_STEPS)
    ascending = scheduler.timesteps.flip(0)
    lo, hi = Official2D.timestep_bounds(len(ascending))
    return ascending[lo:hi].long()


# ---------------------------------------------------------------- VSD: the LoRA pipeline
class RefLoRALinear(nn.Module):
    """diffusers 0.25's ``LoRACompatibleLinear`` with a ``LoRALinearLayer`` at scale 1: ``W x + up(down(x))``."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.normal_(self.down.weight, std=1 / rank)  # LoRALinearLayer's init
        nn.init.zeros_(self.up.weight)

    def forward(self, x, *args, **kwargs):
        return self.base(x) + self.up(self.down(x))


class OfficialVSD(Official2D):
    """``Guidance(use_lora=True)``: the pretrained pipeline and a second UNet (the LoRA base, v-prediction) with the
    camera embedding and LoRA layers; ``vsd_loss`` / ``train_lora`` for one image. :meth:`grad` and
    :meth:`lora_loss` also serve threestudio's 3D ``compute_grad_vsd`` / ``train_lora``, whose LoRA sees the
    view-independent prompt and ``[camera, zeros]`` (the 2D code's camera is zeros, so the two agree)."""

    def __init__(self, base: ModelSource, lora: ModelSource, device: torch.device | str = "cpu"):
        from diffusers import DDIMScheduler
        from diffusers.models.attention_processor import Attention
        from diffusers.models.embeddings import TimestepEmbedding

        super().__init__(base, device)
        self.unet_lora, lora_scheduler_config = load_unet(lora, self.device)
        self.scheduler_lora = DDIMScheduler.from_config(lora_scheduler_config)
        self.scheduler_lora.set_timesteps(OFFICIAL_NUM_INFERENCE_STEPS)
        assert self.scheduler_lora.config.prediction_type == "v_prediction"  # SD 2.1's
        assert self.scheduler.config.prediction_type == "epsilon"
        for p in self.unet_lora.parameters():
            p.requires_grad_(False)
        self.camera_embedding = TimestepEmbedding(OFFICIAL_CAMERA_DIM, self.unet_lora.config.block_out_channels[0] * 4)
        self.camera_embedding.to(self.device)
        self.unet_lora.class_embedding = self.camera_embedding
        self.lora: dict[str, RefLoRALinear] = {}
        for name, module in list(self.unet_lora.named_modules()):
            if isinstance(module, Attention):
                for proj in ("to_q", "to_k", "to_v"):
                    self.lora[f"{name}.{proj}"] = RefLoRALinear(getattr(module, proj), OFFICIAL_RANK)
                    setattr(module, proj, self.lora[f"{name}.{proj}"])
                self.lora[f"{name}.to_out.0"] = RefLoRALinear(module.to_out[0], OFFICIAL_RANK)
                module.to_out[0] = self.lora[f"{name}.to_out.0"]

    def copy_weights_from(self, unet, camera_embedding, adapter: str) -> None:
        """Initial LoRA / camera weights from sdbridge's peft LoRA (``<module>.lora_A.<adapter>.weight``)."""
        params = dict(unet.named_parameters())
        for name, layer in self.lora.items():
            layer.down.weight.data.copy_(params[f"{name}.lora_A.{adapter}.weight"].detach().float())
            layer.up.weight.data.copy_(params[f"{name}.lora_B.{adapter}.weight"].detach().float())
        self.camera_embedding.load_state_dict(camera_embedding.state_dict())

    def lora_vector(self, attr: str = "data") -> torch.Tensor:
        return torch.cat([getattr(p, attr).detach().flatten().clone() for _, layer in sorted(self.lora.items())
                          for p in (layer.down.weight, layer.up.weight)])

    def camera_vector(self, attr: str = "data") -> torch.Tensor:
        return torch.cat([getattr(p, attr).detach().flatten().clone() for p in self.camera_embedding.parameters()])

    @contextlib.contextmanager
    def disable_unet_class_embedding(self, unet):
        class_embedding = unet.class_embedding
        try:
            unet.class_embedding = None
            yield unet
        finally:
            unet.class_embedding = class_embedding

    def vsd_gradient(self, im, t, noise, text_embeddings, lora_text, camera, cfg_scale):
        """The gradient from the drawn ``t`` and ``noise``: the pretrained UNet on ``text_embeddings`` ([text,
        uncond]) and the LoRA UNet on ``lora_text`` twice with ``[camera, zeros]``, both ``no_grad``."""
        B = im.shape[0]
        with torch.no_grad():
            latents_noisy = self.scheduler.add_noise(im, noise, t)
            latent_model_input = torch.cat([latents_noisy] * 2, dim=0)
            with self.disable_unet_class_embedding(self.unet) as unet:
                pretrain = unet.forward(latent_model_input, torch.cat([t] * 2).to(self.device),
                                        encoder_hidden_states=text_embeddings, cross_attention_kwargs=None)
            cam = camera.view(B, -1)
            est = self.unet_lora.forward(latent_model_input, torch.cat([t] * 2).to(self.device),
                                         encoder_hidden_states=torch.cat([lora_text] * 2),
                                         class_labels=torch.cat([cam, torch.zeros_like(cam)], dim=0),
                                         cross_attention_kwargs={"scale": 1.0}).sample
        p_text, p_uncond = pretrain.sample.chunk(2)
        pretrain = p_uncond + cfg_scale * (p_text - p_uncond)
        alphas_cumprod = self.scheduler_lora.alphas_cumprod.to(device=latents_noisy.device, dtype=latents_noisy.dtype)
        alpha_t, sigma_t = alphas_cumprod[t] ** 0.5, (1 - alphas_cumprod[t]) ** 0.5
        est = (latent_model_input * torch.cat([sigma_t] * 2, dim=0).view(-1, 1, 1, 1)
               + est * torch.cat([alpha_t] * 2, dim=0).view(-1, 1, 1, 1))  # v -> eps
        e_camera, e_uncond = est.chunk(2)
        est = e_uncond + OFFICIAL_CFG_LORA * (e_camera - e_uncond)
        w = (1 - self.scheduler.alphas_cumprod[t.cpu()]).view(-1, 1, 1, 1).to(self.device)
        return torch.nan_to_num(w * (pretrain - est))

    def train_lora(self, latents, text_embeddings, camera, t=None, noise=None, drop: bool | None = None):
        """The LoRA's v-prediction loss on the detached latents (with autograd, for the LoRA optimizer)."""
        B = latents.shape[0]
        latents = latents.detach()
        if t is None:
            t = torch.randint(*OFFICIAL_LORA_T, [B], dtype=torch.long, device=self.device)
        noise = torch.randn_like(latents) if noise is None else noise
        noisy_latents = self.scheduler_lora.add_noise(latents, noise, t)
        target = self.scheduler_lora.get_velocity(latents, noise, t)
        text_cond, _ = text_embeddings.chunk(2)
        if drop is None:
            drop = bool(np.random.random() < OFFICIAL_DROPOUT)
        if drop:
            camera = torch.zeros_like(camera)
        noise_pred = self.unet_lora.forward(noisy_latents, t, encoder_hidden_states=text_cond,
                                            class_labels=camera.view(B, -1), cross_attention_kwargs={"scale": 1.0}).sample
        return F.mse_loss(noise_pred.float(), target.float(), reduction="mean")

    def vsd_loss(self, im, prompt, cfg_scale=100.0, draws: dict | None = None, train: bool = True) -> dict:
        """``vsd_loss`` (2D): zero cameras, the prompt for both UNets, then ``train_lora`` on the same image
        (``train=False``: without it). ``draws``: ``t``, ``noise``, ``lora_t``, ``lora_noise``, ``drop`` (each drawn
        when missing)."""
        d = draws or {}
        self.update_text_features(tgt_prompt=prompt)
        B = im.shape[0]
        camera = torch.zeros([B, 4, 4], device=self.device)
        with torch.no_grad():
            t = d.get("t")
            if t is None:
                t = torch.randint(OFFICIAL_T_MIN, OFFICIAL_T_MAX + 1, [B], dtype=torch.long, device=self.device)
            noise = torch.randn_like(im) if d.get("noise") is None else d["noise"]
        text_embeddings = torch.cat([self.tgt_text_feature, self.null_text_feature], dim=0)
        grad = self.vsd_gradient(im, t, noise, text_embeddings, self.tgt_text_feature, camera, cfg_scale)
        if not train:
            return self.loss_dict(im, grad, t)
        return self.loss_dict(im, grad, t, lora_loss=self.train_lora_2d(im, draws))

    def train_lora_2d(self, im, draws: dict | None = None) -> torch.Tensor:
        """``vsd_loss``'s ``train_lora`` call: the prompt's features, zero cameras."""
        d = draws or {}
        camera = torch.zeros([im.shape[0], 4, 4], device=self.device)
        text_embeddings = torch.cat([self.tgt_text_feature, self.null_text_feature], dim=0)
        return self.train_lora(im, text_embeddings, camera, d.get("lora_t"), d.get("lora_noise"), d.get("drop"))

    # -- given texts (the parity tests: 2D and threestudio's 3D)
    def grad(self, im, t, noise, text_vd: str, text_lora: str, camera, cfg=OFFICIAL_CFG):
        """The VSD gradient. 2D: ``text_vd == text_lora`` = the prompt, ``camera`` zeros; 3D: the view-dependent
        prompt for the pretrained CFG, the plain prompt and ``c2w`` for the LoRA."""
        text_embeddings = torch.cat([self.text(text_vd), self.null_text_feature])
        return self.vsd_gradient(im, t, noise, text_embeddings, self.text(text_lora), camera, cfg)

    def lora_loss(self, im, t, noise, text_lora: str, camera, drop: bool):
        return self.train_lora(im, torch.cat([self.text(text_lora), self.null_text_feature]), camera, t, noise, drop)

    def lora_optimizer(self, lr, betas, eps, weight_decay):
        return torch.optim.AdamW([{"params": self.unet_lora.parameters(), "lr": lr}], betas=betas, eps=eps,
                                 weight_decay=weight_decay)

    def generate_2d(self, im0, draws, lora_first: bool = True):
        """generate.py's vsd loop from ``im0`` with given draws per step; returns images, LoRA losses and the final
        LoRA vector. ``lora_first=False`` moves the LoRA update after the image step (not official)."""
        loop = GenerateLoop(self, GenerateArgs(mode="vsd"), im0, save_every=0, lora_first=lora_first)
        images, losses = [], []
        for step, d in enumerate(draws):
            out = loop.step(step, d)
            images.append(loop.im.detach().clone())
            losses.append(float(out["lora_loss"]))
        return images, losses, self.lora_vector()


# ---------------------------------------------------------------- generate.py's loop
@dataclass
class GenerateArgs:
    """generate.py's arguments (its defaults)."""

    prompt: str = OFFICIAL_PROMPT
    mode: str = "bridge"
    cfg_scale: float = OFFICIAL_CFG_SCALE
    lr: float = OFFICIAL_LR
    stage_two_start_step: int = OFFICIAL_STAGE_TWO_START

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")


class GenerateLoop:
    """generate.py from its latent on: the optimizers it builds, then :meth:`step` = one iteration of its loop.

    ``save_every``: the debug PNG cadence (the official 10; 0: none) written into ``save_dir``; the mp4 that
    generate.py writes every 100 steps is left out. ``lora_first=False`` is the non-official order (parity test).
    """

    def __init__(self, guidance: Official2D, args: GenerateArgs, im0: torch.Tensor, save_every: int = OFFICIAL_SAVE_EVERY,
                 save_dir: Path | None = None, lora_first: bool = True):
        self.guidance, self.args = guidance, args
        self.im = im0.clone().to(guidance.device).requires_grad_(True)
        self.im.retain_grad()
        self.im_optimizer = torch.optim.AdamW([self.im], lr=args.lr, betas=(0.9, 0.99), eps=1e-15)
        self.lora_optimizer = None
        if args.mode == "vsd":
            lr = LORA_ADAMW_2D["lr"]
            self.lora_optimizer = torch.optim.AdamW([{"params": guidance.unet_lora.parameters(), "lr": lr}],
                                                    weight_decay=0)
        self.save_every, self.save_dir, self.lora_first = save_every, save_dir, lora_first

    def step(self, step: int, draws: dict | None = None) -> dict:
        g, a, im = self.guidance, self.args, self.im
        d = draws or {}
        g.guidance_scale = a.cfg_scale
        if a.mode == "vsd":
            loss_dict = g.vsd_loss(im, a.prompt, cfg_scale=OFFICIAL_CFG, draws=d, train=self.lora_first)
            if self.lora_first:
                self.lora_update(loss_dict["lora_loss"])
        elif a.mode == "nfsd":
            loss_dict = g.nfsd_loss(im, a.prompt, a.cfg_scale, t=d.get("t"), noise=d.get("noise"))
        elif a.mode == "bridge" and step >= a.stage_two_start_step:
            loss_dict = g.bridge_stage_two_loss(im, a.prompt, a.cfg_scale, t=d.get("t"), noise=d.get("noise"))
        else:  # sds, and bridge before stage two
            loss_dict = g.sds_loss(im, a.prompt, a.cfg_scale, t=d.get("t"), noise=d.get("noise"))
        grad = loss_dict["grad"]
        im.backward(gradient=grad)
        self.im_optimizer.step()
        self.im_optimizer.zero_grad()
        if a.mode == "vsd" and not self.lora_first:  # the LoRA fitted to the updated image
            loss_dict["lora_loss"] = g.train_lora_2d(im, d)
            self.lora_update(loss_dict["lora_loss"])
        if self.save_every and step % self.save_every == 0:
            with torch.no_grad():
                decoded = g.decode_latent(im.detach())
            save_png(decoded, Path(self.save_dir) / "debug_image.png")
        return loss_dict

    def lora_update(self, lora_loss: torch.Tensor) -> None:
        lora_loss.backward()
        self.lora_optimizer.step()
        self.lora_optimizer.zero_grad()
