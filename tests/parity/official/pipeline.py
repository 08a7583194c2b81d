"""The Stable Diffusion components as the official codes load them: diffusers alone (no sdbridge).

Every official code calls ``StableDiffusionPipeline.from_pretrained`` (the SDS-Bridge 2D code through
``DiffusionPipeline``, which resolves to the same class) and keeps its UNet, VAE, tokenizer and text encoder frozen.
A model is a diffusers folder (the tiny random SD that sdbridge builds offline) or, for the random-weight SD 2.1
base of the benchmark, its prebuilt modules (a dict as ``sdbridge.priors.random_sd.build_random_sd21_base``
returns), assembled into the same pipeline class with SD 2.1 base's scheduler config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

#: a diffusers folder, or prebuilt components: tokenizer, text_encoder, unet, vae (and an optional scheduler_config)
ModelSource = Union[str, Path, dict]

# The scheduler config of stabilityai/stable-diffusion-2-1-base (scheduler/scheduler_config.json), which the official
# codes turn into a DDIMScheduler: no timestep_spacing key, so diffusers' default "leading" spacing applies.
SD21_BASE_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def load_pipeline(source: ModelSource, device: torch.device | str = "cpu"):
    """``StableDiffusionPipeline.from_pretrained(folder)`` without safety checker, on ``device``; or the pipeline of
    prebuilt components with SD 2.1 base's scheduler config (``source["scheduler_config"]`` overrides its keys)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if isinstance(source, dict):
        scheduler = DDIMScheduler.from_config({**SD21_BASE_SCHEDULER_CONFIG, **source.get("scheduler_config", {})})
        pipe = StableDiffusionPipeline(vae=source["vae"], text_encoder=source["text_encoder"],
                                       tokenizer=source["tokenizer"], unet=source["unet"], scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    return pipe.to(device)


def load_unet(source: ModelSource, device: torch.device | str = "cpu"):
    """A second UNet and its scheduler config (the VSD codes' LoRA base): ``(unet, scheduler config)``."""
    if isinstance(source, dict):
        return source["unet"].to(device), {**SD21_BASE_SCHEDULER_CONFIG, **source.get("scheduler_config", {})}
    pipe = load_pipeline(source, device)
    return pipe.unet, dict(pipe.scheduler.config)


class DiffusersSD:
    """The pipeline's UNet (eval), VAE, tokenizer and text encoder, all frozen, on ``device``; the UNet and the VAE
    in ``dtype`` (``from_pretrained(..., torch_dtype=)`` in threestudio and LucidDreamer)."""

    def __init__(self, source: ModelSource, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.pipe = load_pipeline(source, self.device)
        self.unet, self.vae = self.pipe.unet.eval(), self.pipe.vae.eval()
        if dtype != self.unet.dtype:
            self.unet.to(dtype)
            self.vae.to(dtype)
        self.tokenizer, self.text_encoder = self.pipe.tokenizer, self.pipe.text_encoder
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)

    @torch.no_grad()
    def text(self, prompt: str | list[str]) -> torch.Tensor:
        """The official ``encode_text`` / ``get_text_embeds``: the last hidden state of the max-length padded tokens."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """``vae.decode(latent / scaling_factor)`` mapped to [0, 1] (the official codes' ``decode_latent(s)``)."""
        images = self.vae.decode(latent / self.vae.config.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1)


def save_png(images: torch.Tensor, path: Path) -> None:
    """The loops' debug image: the batch side by side as one PNG (the SDS-Bridge loop writes it with ``plt.imsave``;
    matplotlib is not a dependency here, so imageio writes the same uint8 image)."""
    import imageio.v3 as iio
    import numpy as np

    rgb = images.float().cpu().permute(0, 2, 3, 1).permute(1, 0, 2, 3).flatten(start_dim=1, end_dim=2)
    iio.imwrite(path, (rgb.numpy() * 255).round().astype(np.uint8))


__all__ = ["DiffusersSD", "ModelSource", "SD21_BASE_SCHEDULER_CONFIG", "load_pipeline", "load_unet", "save_png"]
