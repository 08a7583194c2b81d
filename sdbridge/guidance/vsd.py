"""Variational Score Distillation (VSD; ProlificDreamer, Wang et al., NeurIPS 2023).

    grad = w(t) * ( CFG_7.5(x_t; y) - eps_phi(x_t; y, c) )

eps_src is a copy of the prior fitted online to the current samples: every step it takes one AdamW step of the
diffusion loss on the detached x0 (t ~ U[0, 1000), 10% condition dropout). Two source networks:

* **LoRA** (Stable Diffusion priors): a peft LoRA on the prior's own UNet plus a camera embedding in the UNet's
  class-embedding slot (``TimestepEmbedding(16, time_embed_dim)``, zeros in 2D). The pretrained prediction and the
  LoRA prediction come from the same UNet with adapters switched off / on, so no second UNet is held in memory.
  LoRA starts as the identity (B = 0), so the source starts as the pretrained conditional model.
* **Residual eps network** (pixel priors such as the exact prior): eps_src = eps_prior(x_t; y) + r(x_t, t, y) with
  r a small diffusers ``UNet2DModel`` whose output layer starts at zero — the same "pretrained + learned correction"
  start as LoRA.

Defaults from davidmcall/SDS-Bridge ``2D_experiments`` (``generate.py``, ``guidance.py``): CFG 7.5, t ~ U{20..980},
LoRA AdamW lr 3e-4 with weight decay 0, one LoRA step per iteration, 10% dropout of the camera condition; LoRA rank 4
(diffusers' LoRAAttnProcessor default there). Unlike that code, the LoRA is trained on this prior's own prediction
type (it uses a separate SD 2.1 v-model as the LoRA base).

``guidance=vsd_full_bridge`` replaces the one-step difference by the full bridge (base class): PF-ODE inversion of x0
with the LoRA source, PF-ODE generation with the pretrained target.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdbridge import rng
from sdbridge.guidance.base import Guidance, GuidanceConfig
from sdbridge.priors.stable_diffusion import StableDiffusionPrior

CAMERA_DIM = 16  # a flattened 4x4 camera-to-world matrix (threestudio's convention); zeros for 2D targets


@dataclass
class VSDConfig(GuidanceConfig):
    scale: float = 7.5
    lora_rank: int = 4
    lora_lr: float = 3e-4
    lora_weight_decay: float = 0.0
    lora_steps: int = 1  # source-network updates per optimization step
    condition_dropout: float = 0.1
    train_min_step: int = 0  # source training draws t ~ U[train_min_step, train_max_step)
    train_max_step: int = 1000
    residual_channels: int = 32  # width of the residual eps network (pixel priors)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank < 1 or self.lora_steps < 1:
            raise ValueError("guidance.lora_rank and guidance.lora_steps must be >= 1")
        if not self.lora_lr > 0:
            raise ValueError(f"guidance.lora_lr={self.lora_lr} must be > 0")
        if not 0 <= self.condition_dropout <= 1:
            raise ValueError(f"guidance.condition_dropout={self.condition_dropout} must be in [0, 1]")
        if not 0 <= self.train_min_step < self.train_max_step <= 1000:
            raise ValueError("guidance.train_min_step / train_max_step must satisfy 0 <= min < max <= 1000")


class LoRASource(nn.Module):
    """LoRA adapters on the SD prior's UNet (switched on only inside :meth:`active`) and a camera embedding."""

    ADAPTER = "sdbridge_vsd"

    def __init__(self, prior: StableDiffusionPrior, rank: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding
        from peft import LoraConfig

        object.__setattr__(self, "prior", prior)
        unet = prior.unet
        if self.ADAPTER in getattr(unet, "peft_config", {}):  # a prior reused across runs: start fresh
            unet.delete_adapters(self.ADAPTER)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
            adapter_name=self.ADAPTER,
        )
        unet.disable_adapters()
        for p in self.lora_parameters():  # train in fp32 on an fp16 UNet: AdamW's eps underflows in fp16
            p.data = p.data.float()
        time_dim = unet.config.block_out_channels[0] * 4
        self.camera_embedding = TimestepEmbedding(CAMERA_DIM, time_dim).to(prior.device)
        nn.init.zeros_(self.camera_embedding.linear_2.weight)  # starts adding nothing: the source starts as the
        nn.init.zeros_(self.camera_embedding.linear_2.bias)  # pretrained model (threestudio starts it random)
        for p in self.lora_parameters():
            p.requires_grad_(True)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.prior.unet.named_parameters() if self.ADAPTER in n]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_parameters(), *self.camera_embedding.parameters()]

    @contextlib.contextmanager
    def active(self):
        """Adapters on and the camera embedding in place (re-entrant). Backward passes through the LoRA must run
        inside it too: peft turns ``requires_grad`` off when adapters are disabled, and autograd then skips them."""
        unet = self.prior.unet
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth == 1:
            unet.enable_adapters()
            unet.set_adapter(self.ADAPTER)
            unet.class_embedding = self.camera_embedding
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                unet.class_embedding = None
                unet.disable_adapters()

    def forward(self, x_t, t, prompts, camera) -> torch.Tensor:
        """(eps prediction, native output) of the adapted UNet."""
        emb = self.prior.encode_text(list(prompts)).value
        with self.active():
            raw = self.prior.unet_raw(x_t, t, emb, class_labels=camera)
        return self.prior.raw_to_eps(raw, x_t, t), raw

    def training_target(self, x0, noise, t):
        return self.prior.training_target(x0, noise, t)

    def train_context(self):
        return self.active()

    def state(self) -> dict[str, Any]:
        from peft.utils import get_peft_model_state_dict

        return {
            "lora": get_peft_model_state_dict(self.prior.unet, adapter_name=self.ADAPTER),
            "camera_embedding": self.camera_embedding.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.prior.unet, state["lora"], adapter_name=self.ADAPTER)
        self.camera_embedding.load_state_dict(state["camera_embedding"])


class ResidualEpsSource(nn.Module):
    """eps_prior(x_t; y) + r(x_t, t, prompt class) with r a small UNet2DModel whose output starts at 0.

    The prompt enters as a class label (0 = dropped condition). Camera conditioning is the LoRA source's only.
    """

    def __init__(self, prior, prompts: Sequence[str], channels: int):
        super().__init__()
        from diffusers import UNet2DModel

        object.__setattr__(self, "prior", prior)
        self.classes = {p: i + 1 for i, p in enumerate(dict.fromkeys(prompts))}  # 0 = dropped condition
        c, size = prior.sample_shape[0], prior.sample_shape[-1]
        self.net = UNet2DModel(
            sample_size=size, in_channels=c, out_channels=c,
            block_out_channels=(channels, 2 * channels), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=len(self.classes) + 1, norm_num_groups=8,
        )
        nn.init.zeros_(self.net.conv_out.weight)
        nn.init.zeros_(self.net.conv_out.bias)
        self.to(prior.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def forward(self, x_t, t, prompts, camera, drop: torch.Tensor | None = None) -> torch.Tensor:
        labels = torch.tensor([self.classes.get(p, 0) for p in prompts], device=x_t.device)
        if drop is not None:
            labels = torch.where(drop, torch.zeros_like(labels), labels)
        base_prompts = [("" if (drop is not None and bool(drop[i])) else p) for i, p in enumerate(prompts)]
        with torch.no_grad():
            base = self.prior.predict_eps(x_t, t, [self.prior.encode_text(base_prompts)])[0]
        self.prior.nfe -= 1  # the source counts as one evaluation, made by the caller
        out = base + self.net(x_t, t, class_labels=labels).sample
        return out, out

    def training_target(self, x0, noise, t):
        return noise

    def train_context(self):
        return contextlib.nullcontext()

    def state(self) -> dict[str, Any]:
        return {}  # a registered submodule: its weights are in the checkpoint's state_dict

    def load(self, state: dict[str, Any]) -> None:
        pass


class VSD(Guidance):
    SUMMARY = {"eps_tgt": "CFG_s(x_t; y)", "eps_src": "eps_phi(x_t; y, c): LoRA / residual net trained online", "noise": "fresh N(0, I)", "nfe": "3 (+1 training pass)"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.source: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None

    def prepare(self, prompts: Sequence[str]) -> None:
        super().prepare(prompts)
        self.prior.encode_text([""])
        if self.source is None:
            # initial weights from the run's seed, not torch's global RNG, and without drawing from the run's
            # generator: every method sees the same initial images and noise for the same seed
            seed = (self.generator.initial_seed() * 1_000_003 + 17) % (2**31 - 1)
            with torch.random.fork_rng():  # CPU and CUDA generators (LoRA weights are created on the UNet's device)
                torch.manual_seed(seed)
                if isinstance(self.prior, StableDiffusionPrior):
                    self.source = LoRASource(self.prior, self.config.lora_rank)
                else:
                    self.source = ResidualEpsSource(self.prior, prompts, self.config.residual_channels)
            self.optimizer = torch.optim.AdamW(
                self.source.trainable_parameters(), lr=self.config.lora_lr, weight_decay=self.config.lora_weight_decay
            )
        if self._pending_state is not None:
            self.set_extra_state(self._pending_state)

    def _ensure_source(self, prompts: Sequence[str]) -> None:
        if self.source is None:
            self.prepare(prompts)

    def has_model_source(self, step: int) -> bool:
        return True

    def camera(self, batch_size: int, device) -> torch.Tensor:
        """The step's cameras (3D targets) or zeros (images)."""
        if self.cameras is not None and self.cameras.shape == (batch_size, CAMERA_DIM):
            return self.cameras.to(device=device, dtype=torch.float32)
        return torch.zeros(batch_size, CAMERA_DIM, device=device)

    def source_from(self, eps, x_t, t, kappa, prompts, step):
        self._ensure_source(prompts)
        pred, _ = self.source(x_t, t, prompts, self.camera(x_t.shape[0], x_t.device))
        self.prior.nfe += 1
        return pred.float()

    def train_step(self, x0: torch.Tensor, prompts: Sequence[str], step: int) -> dict[str, float]:
        """One diffusion-loss step of the source network on the detached current samples."""
        self._ensure_source(prompts)
        c = self.config
        losses = []
        for _ in range(c.lora_steps):
            B = x0.shape[0]
            t = rng.randint(c.train_max_step, B, self.generator, low=c.train_min_step).to(x0.device)
            noise = self.sample_noise(x0)
            x_t = self.add_noise(x0, noise, t)
            drop = (rng.rand(B, self.generator) < c.condition_dropout).to(x0.device)
            camera = self.camera(B, x0.device) * (~drop).float().unsqueeze(1)
            texts = [("" if bool(d) else p) for d, p in zip(drop, prompts)]
            with self.source.train_context():
                if isinstance(self.source, ResidualEpsSource):
                    _, raw = self.source(x_t, t, prompts, camera, drop=drop)
                else:
                    _, raw = self.source(x_t, t, texts, camera)
                loss = F.mse_loss(raw.float(), self.source.training_target(x0, noise, t).float())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return {"source_loss": sum(losses) / len(losses)}

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
