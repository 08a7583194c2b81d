"""The tiny SD folder as the official codes load it: diffusers alone (no sdbridge), shared by the parity modules'
re-derivations of threestudio's and LucidDreamer's guidances."""

from __future__ import annotations

import torch


class DiffusersSD:
    """``StableDiffusionPipeline.from_pretrained(folder)``'s UNet (eval, fp32), tokenizer and text encoder."""

    def __init__(self, folder):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False).to("cpu")
        self.unet, self.tokenizer, self.text_encoder = pipe.unet.eval(), pipe.tokenizer, pipe.text_encoder
        assert self.unet.dtype == torch.float32

    @torch.no_grad()
    def text(self, prompt: str | list[str]) -> torch.Tensor:
        """The prompt processors' ``encode_prompt``: the last hidden state of the max-length padded tokens."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]
