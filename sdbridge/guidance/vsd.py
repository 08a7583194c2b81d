"""Variational Score Distillation (VSD; ProlificDreamer, Wang et al., NeurIPS 2023).

    grad = w(t) * ( CFG_7.5(x_t; y) - eps_phi(x_t; y, c) )

eps_src is a model fitted online to the current samples: every step it takes one AdamW step of the diffusion loss
on the detached x0 (t ~ U{0..999}, 10% condition dropout). Two source networks:

* **LoRA** (Stable Diffusion priors): rank-4 LoRA on the attention projections (to_q, to_k, to_v, to_out.0) of a
  UNet, plus a camera embedding ``TimestepEmbedding(16, time_embed_dim)`` in that UNet's class-embedding slot, fed
  the flattened camera-to-world matrix (zeros for images). By default the UNet is a **separate** model,
  ``lora_base`` = SD 2.1 (v-prediction; its output is turned into eps with ``eps = sqrt(abar) v + sqrt(1-abar) x_t``
  and it is trained on the v target), as in both official codes; ``lora_base=prior`` puts the adapters on the
  prior's own UNet instead (switched off for the pretrained prediction: no second UNet in memory).
* **Residual eps network** (pixel priors such as the exact prior): eps_src = eps_prior(x_t; y) + r(x_t, t, y) with
  r a small diffusers ``UNet2DModel`` whose output layer starts at zero, trained on the v target like the official
  LoRA base (``residual_target``; its eps error weighted by 1 / abar). It has no camera. On images larger than 16 px
  it sees them folded into 2 x 2 (or larger) pixel blocks (``residual_patch``), which makes a pass cheaper at the
  same fit.

Official sources (the defaults reproduce them; tests/parity/test_vsd_parity.py re-derives their math):

* ``guidance=vsd`` (2D) = davidmcall/SDS-Bridge at ``240e06e511c7c5813dc9caf5d14f54237beaa992``,
  ``2D_experiments/guidance.py`` (``vsd_loss``, ``train_lora``, the LoRA setup in ``Guidance.__init__``) and
  ``2D_experiments/generate.py`` (``cfg_scale=7.5`` for vsd; the LoRA optimizer ``AdamW(unet_lora.parameters(),
  lr=3e-4, weight_decay=0)`` with torch's betas (0.9, 0.999) and eps 1e-8; the loop trains the LoRA on the image
  *before* the image step): t ~ randint(20, 981), w = 1 - abar, LoRA base ``stabilityai/stable-diffusion-2-1``,
  camera condition zeros, LoRA trained with t ~ randint(0, 1000) on the prompt with a 10% chance per step of zeroing
  the (already zero) camera.
* ``experiment=nerf_vsd`` (3D) = threestudio-project/threestudio at ``28d9d80d9d00f308244adfcf3be8b17ca0cb6465``,
  ``threestudio/models/guidance/stable_diffusion_vsd_guidance.py`` (``compute_grad_vsd``, ``train_lora``,
  ``forward``) and ``configs/prolificdreamer.yaml``: the same math; the LoRA conditioned on the view-independent
  prompt and on ``c2w`` (``camera_condition_type: extrinsics``), dropout zeroing the camera of the whole batch; the
  guidance's parameters in the system's AdamW at lr 1e-4, betas (0.9, 0.99), eps 1e-15, torch's weight decay 0.01.
  Both LoRA and target are stepped from the same render (one optimizer step), which is ``before_target_step`` here.

Both official codes build LoRA with diffusers' ``LoRAAttnProcessor`` (down ~ N(0, 1/rank^2), up = 0, no alpha
scaling: peft's ``init_lora_weights="gaussian"`` with ``lora_alpha = rank``) and leave the camera embedding at
torch's random init. Conventions kept from them: the LoRA's own CFG (``guidance_scale_lora = 1``) is the camera
prediction itself, so one LoRA evaluation per step; threestudio's surrogate loss is divided by the batch size (the
prolificdreamer batch is 1), sdbridge's is per sample.

``guidance=vsd_full_bridge`` replaces the one-step difference by the full bridge (base class): PF-ODE inversion of x0
with the LoRA source, PF-ODE generation with the pretrained target.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdbridge import rng
from sdbridge.guidance.base import Guidance, GuidanceConfig, as_enum
from sdbridge.priors.base import attach_prior
from sdbridge.priors.stable_diffusion import StableDiffusionPrior
from sdbridge.views import StepPrompts
from sdbridge.registry import builds

CAMERA_DIM = 16  # a flattened 4x4 camera-to-world matrix (threestudio's "extrinsics"); zeros for 2D targets
LORA_ON_PRIOR = "prior"  # guidance.lora_base value: adapters on the prior's own UNet


class LoRAInit(Enum):
    gaussian = "down ~ N(0, 1/rank^2), up = 0: diffusers' LoRAAttnProcessor (both official codes)"
    kaiming = "down ~ kaiming-uniform, up = 0: peft's default (sdbridge before issue #13)"


class CameraInit(Enum):
    random = "torch's default Linear init (both official codes): adds a learned offset even for a zero camera"
    zero = "output layer zeroed: the embedding starts adding nothing, so the source starts as its base model"


class ConditionDropout(Enum):
    camera = "with probability p, the cameras of the whole batch are zeroed; the text stays (both official codes)"
    camera_and_text = "per sample, camera zeroed and text blanked: also learns an unconditional source"


class LoRAPrompt(Enum):
    view_independent = "the prompt without view suffixes (threestudio)"
    view_dependent = "the step's view-dependent prompts, as the pretrained target sees them"


@dataclass
class VSDConfig(GuidanceConfig):
    """Defaults: the Bridge paper's 2D code (module docstring); ``experiment=nerf_vsd`` sets threestudio's 3D values.
    Each non-official option says why it exists."""

    scale: float = 7.5
    # the LoRA's base UNet: a hub id or diffusers folder (official: SD 2.1, v-prediction), or "prior": adapters on the
    # prior's own UNet, switched off for the pretrained prediction (saves a second UNet's memory and load)
    lora_base: str = "stabilityai/stable-diffusion-2-1"
    lora_rank: int = 4
    lora_init: LoRAInit = LoRAInit.gaussian  # kaiming: peft's default init (sdbridge's choice before issue #13)
    lora_lr: float = 3e-4
    lora_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # torch's AdamW defaults (2D code)
    lora_eps: float = 1e-8
    lora_weight_decay: float = 0.0
    lora_steps: int = 1  # source-network updates per optimization step
    lora_timestep_samples: int = 1  # official lora_n_timestamp_samples: copies of the batch, each with its own t
    condition_dropout: float = 0.1
    # camera_and_text: per-sample dropout that also blanks the text (teaches the source an unconditional prediction)
    dropout: ConditionDropout = ConditionDropout.camera
    camera_init: CameraInit = CameraInit.random  # zero: the source starts exactly as its base model
    # view_dependent: the LoRA sees the same texts as the pretrained target (sdbridge before issue #13)
    lora_prompt: LoRAPrompt = LoRAPrompt.view_independent
    # false: train after the target step; an image target's LoRA then fits the image just produced
    train_before_target_step: bool = True
    train_min_step: int = 0  # source training draws t ~ U[train_min_step, train_max_step)
    train_max_step: int = 1000
    # width of the residual eps network's first level (pixel priors; ours, the stand-in for the official rank-4 LoRA),
    # 0: 16 per fold of ``residual_patch`` (16 unfolded, 32 folded by 2): unfolded, 16 runs the exact table's VSD rows in
    # half the time of 32 at equal FD; folded by 2, 16 fits the images less and 32 as well (experiments/exact/README.md)
    residual_channels: int = 0
    # the residual eps network's mid-block self-attention (diffusers UNet2DModel's ``add_attention``): off, the
    # source fits its images as well (experiments/exact/vsd_source_fit.py) and a VSD step costs 0.81x, a VSD + full
    # bridge step 0.87x (experiments/exact/README.md, 2026-12-06)
    residual_attention: bool = False
    # what the residual source is trained to predict: "v" (sqrt(abar) eps - sqrt(1 - abar) x0), as the official LoRA
    # base (SD 2.1, v-prediction) is, i.e. its eps error weighted by 1 / abar; "eps": the plain eps target
    residual_target: str = "v"
    #: the residual eps network sees the image folded into patch x patch blocks (``pixel_unshuffle``: 3 x S x S ->
    #: 3 patch^2 x S/patch x S/patch) and unfolds its output. 0: folded to ~16 px (``residual_layout``): on the 32 px
    #: exact prior a pass at width 32 folded by 2 costs 0.7x one at width 16 unfolded and fits the images as well
    #: (experiments/exact/README.md, 2026-12-07); the learned prior's 16 px images stay unfolded
    residual_patch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lora_init = as_enum(LoRAInit, self.lora_init, "guidance.lora_init")
        self.dropout = as_enum(ConditionDropout, self.dropout, "guidance.dropout")
        self.camera_init = as_enum(CameraInit, self.camera_init, "guidance.camera_init")
        self.lora_prompt = as_enum(LoRAPrompt, self.lora_prompt, "guidance.lora_prompt")
        for key in ("lora_rank", "lora_steps", "lora_timestep_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"guidance.{key}={getattr(self, key)} must be >= 1")
        if not self.lora_base:
            raise ValueError(f"guidance.lora_base must be a model id, a folder or {LORA_ON_PRIOR!r}")
        if not self.lora_lr > 0:
            raise ValueError(f"guidance.lora_lr={self.lora_lr} must be > 0")
        if len(self.lora_betas) != 2 or not all(0 <= b < 1 for b in self.lora_betas):
            raise ValueError(f"guidance.lora_betas={list(self.lora_betas)} must be two numbers in [0, 1)")
        if not self.lora_eps > 0 or self.lora_weight_decay < 0:
            raise ValueError("guidance.lora_eps must be > 0 and guidance.lora_weight_decay >= 0")
        if not 0 <= self.condition_dropout <= 1:
            raise ValueError(f"guidance.condition_dropout={self.condition_dropout} must be in [0, 1]")
        if self.residual_channels < 0 or self.residual_channels % 8:
            raise ValueError(f"guidance.residual_channels={self.residual_channels} must be 0 (16 per fold) or a positive "
                             "multiple of 8 (the residual network's group norms have 8 groups)")
        if self.residual_patch < 0:
            raise ValueError(f"guidance.residual_patch={self.residual_patch} must be >= 1, or 0 (folded to ~16 px)")
        if self.residual_target not in ("v", "eps"):
            raise ValueError(f"guidance.residual_target={self.residual_target!r} is not one of ['v', 'eps']")
        if not 0 <= self.train_min_step < self.train_max_step <= 1000:
            raise ValueError("guidance.train_min_step / train_max_step must satisfy 0 <= min < max <= 1000")


class Source(nn.Module):
    """VSD's eps_phi: a network trained online on the current samples. Both kinds share this interface:
    ``forward(x_t, t, prompts, camera, drop=None) -> (eps, native output)`` is one evaluation, counted by the prior
    it runs on (``drop``: per-sample mask of dropped conditions, the text blanked and the class unset);
    ``add_noise`` / ``training_target`` are its model's forward process and training target; ``train_context``
    is where its backward passes run; ``state`` / ``load`` carry what the guidance's state_dict does not."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def train_context(self):
        return contextlib.nullcontext()

    def state(self) -> dict[str, Any]:
        return {}  # a registered submodule: its weights are in the checkpoint's state_dict

    def load(self, state: dict[str, Any]) -> None:
        pass


def kept_texts(prompts: Sequence[str], drop: torch.Tensor | None) -> list[str]:
    """The prompts with dropped conditions blanked (the empty text: classifier-free dropout)."""
    return list(prompts) if drop is None else [("" if bool(d) else p) for d, p in zip(drop, prompts)]


class LoRASource(Source):
    """LoRA adapters and a camera embedding on a UNet: the prior's own (adapters on only inside
    :meth:`StableDiffusionPrior.adapter`) or a separate base model loaded by :meth:`StableDiffusionPrior.companion`
    (its evaluations count as the run's NFEs)."""

    ADAPTER = "sdbridge_vsd"

    def __init__(self, prior: StableDiffusionPrior, config: VSDConfig):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        model = prior if config.lora_base == LORA_ON_PRIOR else prior.companion(config.lora_base)
        attach_prior(self, prior)
        object.__setattr__(self, "model", model)  # not a submodule: its weights stay out of checkpoints
        model.add_lora(self.ADAPTER, config.lora_rank, gaussian_init=config.lora_init is LoRAInit.gaussian)
        time_dim = model.unet.config.block_out_channels[0] * 4
        self.camera_embedding = TimestepEmbedding(CAMERA_DIM, time_dim).to(prior.device)
        if config.camera_init is CameraInit.zero:
            nn.init.zeros_(self.camera_embedding.linear_2.weight)
            nn.init.zeros_(self.camera_embedding.linear_2.bias)

    def lora_parameters(self) -> list[nn.Parameter]:
        return self.model.lora_parameters(self.ADAPTER)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_parameters(), *self.camera_embedding.parameters()]

    def active(self):
        """Adapters on and the camera embedding in place (re-entrant)."""
        return self.model.adapter(self.ADAPTER, self.camera_embedding)

    def forward(self, x_t, t, prompts, camera, drop: torch.Tensor | None = None):
        emb = self.prior.encode_text(kept_texts(prompts, drop)).value
        with self.active():
            raw = self.model.predict_raw(x_t, t, emb, class_labels=camera)
        return self.model.raw_to_eps(raw, x_t, t), raw

    def add_noise(self, x0, noise, t):
        """x_t on the base model's own schedule (official: ``scheduler_lora.add_noise``)."""
        return self.model.add_noise(x0, noise, t)

    def training_target(self, x0, noise, t):
        return self.model.training_target(x0, noise, t)

    def train_context(self):
        return self.active()

    def state(self) -> dict[str, Any]:
        return {"lora": self.model.lora_state(self.ADAPTER), "camera_embedding": self.camera_embedding.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_lora_state(self.ADAPTER, state["lora"])
        self.camera_embedding.load_state_dict(state["camera_embedding"])


RESIDUAL_FOLDED_SIZE = 16  # px the residual network runs at by default (guidance.residual_patch=0)


def residual_layout(size: int, patch: int = 0, channels: int = 0) -> tuple[int, int]:
    """``(patch, width)`` of the residual eps network on ``size`` px samples: ``patch`` 0 picks the largest fold that
    leaves >= 16 px and an even number of patches per side; ``channels`` 0 is 16 per fold."""
    if patch == 0:
        patch = max([1] + [p for p in range(2, size // RESIDUAL_FOLDED_SIZE + 1) if size % (2 * p) == 0])
    return patch, channels or 16 * patch


class ResidualEpsSource(Source):
    """eps_prior(x_t; y) + r(x_t, t, prompt class) with r a small UNet2DModel whose output starts at 0 (pixel and
    exact priors, which have no adapters). One evaluation = the prior's prediction (one NFE) plus the small net.

    The prompt enters as a class label (0 = dropped condition). Camera conditioning is the LoRA source's only.
    ``patch`` > 1: r runs on the image folded into patch x patch blocks (``pixel_unshuffle``) and its output is unfolded
    (``pixel_shuffle``), so the sum is still per pixel.
    """

    #: the network's weights and inputs are channels-last: on these CPU cores (oneDNN convolutions) its forward pass
    #: at batch 48 took 0.85x the contiguous layout's time, a whole VSD + full-bridge process 0.96x and a VSD one 1.00x
    #: (experiments/exact/README.md, 2026-12-07); values differ by float rounding only
    MEMORY_FORMAT = torch.channels_last

    def __init__(self, prior, prompts: Sequence[str], channels: int, target: str = "v", attention: bool = False,
                 patch: int = 1):
        super().__init__()
        self.target, self.patch = target, patch
        from diffusers import UNet2DModel

        attach_prior(self, prior)
        self.classes = {p: i + 1 for i, p in enumerate(dict.fromkeys(prompts))}  # 0 = dropped condition
        c, size = prior.sample_shape[0], prior.sample_shape[-1]
        if size % (2 * patch):
            raise ValueError(f"guidance.residual_patch={patch}: the prior's {size} px samples must split into an even "
                             "number of patches per side (the residual network halves its resolution once)")
        self.net = UNet2DModel(
            sample_size=size // patch, in_channels=c * patch**2, out_channels=c * patch**2,
            block_out_channels=(channels, 2 * channels), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=len(self.classes) + 1, norm_num_groups=8, add_attention=attention,
        )
        nn.init.zeros_(self.net.conv_out.weight)
        nn.init.zeros_(self.net.conv_out.bias)
        self.to(prior.device, memory_format=self.MEMORY_FORMAT)

    def forward(self, x_t, t, prompts, camera, drop: torch.Tensor | None = None):
        labels = torch.tensor([self.classes.get(p, 0) for p in prompts], device=x_t.device)
        if drop is not None:
            labels = torch.where(drop, torch.zeros_like(labels), labels)
        with torch.no_grad():
            base = self.prior.predict_eps(x_t, t, [self.prior.encode_text(kept_texts(prompts, drop))])[0]
        folded = F.pixel_unshuffle(x_t, self.patch).contiguous(memory_format=self.MEMORY_FORMAT)  # patch 1: x_t
        residual = self.net(folded, t, class_labels=labels).sample
        eps = base + F.pixel_shuffle(residual, self.patch)
        return eps, (eps if self.target == "eps" else self.prior.eps_to_v(eps, x_t, t))

    def add_noise(self, x0, noise, t):
        return self.prior.add_noise(x0, noise, t)

    def training_target(self, x0, noise, t):
        return noise if self.target == "eps" else self.prior.v_target(x0, noise, t)


@builds("guidance", "vsd", VSDConfig)
class VSD(Guidance):
    SUMMARY = {"eps_tgt": "CFG_s(x_t; y)", "eps_src": "eps_phi(x_t; y, c): LoRA / residual net trained online", "noise": "fresh N(0, I)", "nfe": "3 (+1 training pass)"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.source: Source | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        #: the draws of the last :meth:`train_step` (``t``, ``noise``, ``camera_drop``, ``text_drop``), for logs and tests
        self.last_train_draws: dict[str, torch.Tensor | None] = {}

    @property
    def train_before_target_step(self) -> bool:
        return self.config.train_before_target_step

    def prepare(self, prompts: Sequence[str]) -> None:
        super().prepare(prompts)
        self.prior.encode_text([""])
        if self.source is None:
            # initial weights from the run's seed, not torch's global RNG, and without drawing from the run's
            # generator: every method sees the same initial images and noise for the same seed
            seed = (self.generator.initial_seed() * 1_000_003 + 17) % (2**31 - 1)
            with torch.random.fork_rng():  # CPU and CUDA generators (LoRA weights are created on the UNet's device)
                torch.manual_seed(seed)
                if self.prior.supports_adapters:
                    self.source = LoRASource(self.prior, self.config)
                else:
                    patch, width = residual_layout(self.prior.sample_shape[-1], self.config.residual_patch,
                                                   self.config.residual_channels)
                    self.source = ResidualEpsSource(self.prior, prompts, width, self.config.residual_target,
                                                    self.config.residual_attention, patch)
            c = self.config
            self.optimizer = torch.optim.AdamW(self.source.trainable_parameters(), lr=c.lora_lr,
                                               betas=tuple(c.lora_betas), eps=c.lora_eps,
                                               weight_decay=c.lora_weight_decay)
        if self._pending_state is not None:
            self.set_extra_state(self._pending_state)

    def _ensure_source(self, prompts: Sequence[str]) -> None:
        if self.source is None:
            self.prepare(prompts)

    def has_model_source(self, step: int) -> bool:
        return True

    def camera(self, prompts: Sequence[str], device) -> torch.Tensor:
        """The step's cameras ``(B, 16)`` (3D targets: flattened camera-to-world, as threestudio) or zeros (images)."""
        views = StepPrompts.of(prompts).views
        if views is None:
            return torch.zeros(len(prompts), CAMERA_DIM, device=device)
        return views.cameras().to(device)

    def source_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The texts the source is conditioned on: the view-independent prompts (``lora_prompt=view_independent``,
        threestudio) or the step's view-dependent texts."""
        prompts = StepPrompts.of(prompts)
        return list(prompts.plain if self.config.lora_prompt is LoRAPrompt.view_independent else prompts)

    def source_from(self, eps, x_t, t, kappa, prompts, step):
        self._ensure_source(prompts)
        pred, _ = self.source(x_t, t, self.source_prompts(prompts), self.camera(prompts, x_t.device))
        return pred.float()

    def draw_training(self, batch_size: int) -> dict[str, torch.Tensor | None]:
        """The random numbers of one source update for a batch of ``batch_size``: ``t`` and ``noise`` for each of the
        ``lora_timestep_samples`` copies of the batch, and the dropout masks (``camera_drop`` over the copies,
        ``text_drop`` only for per-sample ``camera_and_text`` dropout)."""
        c, g, B, k = self.config, self.generator, batch_size, self.config.lora_timestep_samples
        shape = (B, *self.prior.sample_shape)
        t = torch.cat([rng.randint(c.train_max_step, B, g, low=c.train_min_step) for _ in range(k)])
        noise = torch.cat([rng.randn(shape, g) for _ in range(k)])
        if c.dropout is ConditionDropout.camera:  # one draw for the batch (per caption with per-caption generators)
            camera_drop = (rng.per_sample(g, B, lambda gen: torch.rand(1, generator=gen)) < c.condition_dropout)
            return {"t": t, "noise": noise, "camera_drop": camera_drop.repeat(k), "text_drop": None}
        drop = torch.cat([rng.rand(B, g) < c.condition_dropout for _ in range(k)])
        return {"t": t, "noise": noise, "camera_drop": drop, "text_drop": drop}

    def train_step(self, x0: torch.Tensor, prompts: Sequence[str], step: int, *, views=None,
                   draws: dict[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """One diffusion-loss step of the source network on the detached current samples seen from ``views``
        (``lora_steps`` times). ``draws`` (as :meth:`draw_training` returns them) fixes the random numbers of a
        single update."""
        prompts = self.view_prompting.resolve(prompts, views)
        self._ensure_source(prompts)
        c = self.config
        k, dev = c.lora_timestep_samples, x0.device
        x0 = x0.detach().float().repeat(k, *([1] * (x0.dim() - 1)))
        texts = self.source_prompts(prompts) * k
        losses = []
        for _ in range(c.lora_steps):
            d = draws if draws is not None else self.draw_training(len(prompts))
            self.last_train_draws = d
            t, noise = d["t"].to(dev), d["noise"].to(x0)
            camera = self.camera(prompts, dev).repeat(k, 1) * (~d["camera_drop"].to(dev)).float().unsqueeze(1)
            text_drop = d["text_drop"]
            x_t = self.source.add_noise(x0, noise, t)
            with self.source.train_context(), self.prior.uncounted():  # a training pass, not an NFE of the method
                _, raw = self.source(x_t, t, texts, camera, drop=None if text_drop is None else text_drop.to(dev))
                loss = F.mse_loss(raw.float(), self.source.training_target(x0, noise, t).float())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            losses.append(loss.detach())  # a tensor: read only on the steps that log it (no device sync per step)
        return {"source_loss": torch.stack(losses).mean()}

    def get_extra_state(self) -> dict[str, Any]:
        if self.source is None:
            return self._pending_state or {}
        return {"source": self.source.state(), "optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.source is None:  # restored before prepare(): apply once the source exists
            self._pending_state = state
            return
        self.source.load(state["source"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pending_state = None
