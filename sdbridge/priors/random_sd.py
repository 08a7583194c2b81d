"""Stable Diffusion 2.1 base's architecture with random weights (``prior=sd21_base_random``), for benchmarks.

The UNet, VAE and text encoder are built from the published configs of ``stabilityai/stable-diffusion-2-1-base``
(``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json`` on the Hugging Face hub) with the real
diffusers / transformers classes, directly on the target device, and served through :class:`StableDiffusionPrior`.
Same shapes, same kernels, same compute as the real model — 865.9M UNet parameters, 4x64x64 latents, 1024-d
OpenCLIP-H text states — so step times and memory are real-scale, without downloading any weights. Its images and
gradients are meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdbridge.priors.base import resolve_device, resolve_dtype
from sdbridge.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior
from sdbridge.registry import builds

#: stabilityai/stable-diffusion-2-1-base, unet/config.json (diffusers layout)
SD21_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "dual_cross_attention": False,
    "upcast_attention": False,
}
#: stabilityai/stable-diffusion-2-1-base, vae/config.json
SD21_BASE_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
#: stabilityai/stable-diffusion-2-1-base, text_encoder/config.json (OpenCLIP ViT-H/14's text tower, 23 layers used)
SD21_BASE_TEXT: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 512,
}
#: stabilityai/stable-diffusion-2-1-base, scheduler/scheduler_config.json (the parts sdbridge reads)
SD21_BASE_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


@dataclass
class RandomSDConfig(StableDiffusionConfig):
    """``prior=sd21_base_random``: SD 2.1 base's architecture, random weights seeded by ``seed``.

    ``latent_size`` is the side of the latents the UNet is served at (SD 2.1 base: 64, i.e. 512px images). Smaller
    sides keep every weight and kernel of the architecture and only shrink the feature maps, so one UNet call fits a
    CPU's budget (the reduced-scale overhead benchmark, experiments/bench/README.md). The UNet downsamples 3 times,
    so it must be a multiple of 8.
    """

    model: str = "sd21_base_random"
    seed: int = 0
    latent_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_size < 8 or self.latent_size % 8:
            raise ValueError(f"prior.latent_size={self.latent_size} must be a positive multiple of 8 (the UNet "
                             "downsamples 3 times); SD 2.1 base is 64")


def build_random_sd21_base(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                           latent_size: int = 64) -> dict[str, Any]:
    """The components (tokenizer, text encoder, UNet, VAE, scheduler config), initialized on ``device``; the UNet
    serves ``latent_size``-sided latents (the same weights at any size).

    ``device="meta"`` builds shapes only (parameter counts without memory).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdbridge.priors.tiny import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**SD21_BASE_UNET, "sample_size": latent_size})
        vae = AutoencoderKL(**{**SD21_BASE_VAE, "sample_size": 8 * latent_size})
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"], **SD21_BASE_TEXT))
    if device.type != "meta" and dtype != torch.float32:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" (there are none)
        unet, vae, text_encoder = (m.to(dtype) for m in (unet, vae, text_encoder))
        diffusers_logging.set_verbosity(level)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae,
            "scheduler_config": dict(SD21_BASE_SCHEDULER)}


@builds("prior", "sd21_base_random", RandomSDConfig)
class RandomSDPrior(StableDiffusionPrior):
    """SD 2.1 base's architecture with random weights, built in memory (nothing is downloaded or cached)."""

    def __init__(self, config: RandomSDConfig):
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        super().__init__(config, components=build_random_sd21_base(device, dtype, config.seed, config.latent_size))

    def companion(self, model: str) -> StableDiffusionPrior:
        """Any companion model (VSD's LoRA base, SD 2.1 in the official codes) as SD 2.1's UNet with random weights
        (768px config: sample size 96, v-prediction), so the benchmark holds the official second UNet."""
        unet = build_random_sd21_companion_unet(self.device, self.dtype, self.config.seed)
        return self._companion_from(model, unet, {**SD21_BASE_SCHEDULER, "prediction_type": "v_prediction"}, None)


def build_random_sd21_companion_unet(device: torch.device | str, dtype: torch.dtype, seed: int):
    """SD 2.1's UNet (768px config: sample size 96; v-prediction) with random weights seeded ``seed + 1``: the
    companion of :class:`RandomSDPrior` and of the benchmark's official VSD loop."""
    from diffusers import UNet2DConditionModel

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed + 1)
        return UNet2DConditionModel(**{**SD21_BASE_UNET, "sample_size": 96}).to(dtype)


__all__ = ["RandomSDConfig", "RandomSDPrior", "build_random_sd21_base", "build_random_sd21_companion_unet"]
