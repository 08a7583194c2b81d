"""A batch of N independent images, each optimized for its own prompt.

Parameterizations:

* ``latent`` (default for latent priors): the parameter *is* the model-space x0 (SD latents ``(N, 4, h, w)``);
  no VAE is run during optimization, only when saving.
* ``pixel``: the parameter is the image in [-1, 1] units ``(N, 3, S, S)``; renders are ``(p + 1) / 2`` and the prior
  encodes them (VAE for SD, identity for pixel priors). Renders are *not* clamped during optimization, so a method
  that over-saturates shows it in model space (the exact metrics see it); saved PNGs are clamped to [0, 1].

Initialization: ``randn`` (N(0, 1) in parameter space, as the Bridge paper's 2D code starts its latents),
``zeros``, ``image`` (an image file, resized and, for latents, VAE-encoded), or ``denoised``: the prior's one-step
x0 prediction ``(x_T - sqrt(1 - abar_T) eps_7.5(x_T)) / sqrt(abar_T)`` from pure noise x_T for each image's prompt,
with CFG ``init_cfg`` (7.5: the SDI notebook's initialization), or ``samples``: an exact sample of each image's
prompt (priors with a true distribution), to measure what a method does to images that already are the truth
(exactly so in the latent parameterization, the exact prior's default; a pixel parameter starts at the decoded
image, clamped to [0, 1] as saved).

View: ``view=front`` conditions every text on ``"<prompt>, front view"`` (the denoised init too), as threestudio's
2D notebooks do: their prompt processor applies view-dependent prompting at the fixed camera (elevation 0, azimuth 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sdbridge import rng
from sdbridge.media import load_image, make_grid, save_png, slug
from sdbridge.priors.base import DiffusionPrior, attach_prior
from sdbridge.targets.base import Render, Target, TargetConfig
from sdbridge.registry import builds
from sdbridge.views import ViewPrompting


class Parameterization(Enum):
    auto = "latent for latent priors, else pixel"
    latent = "the prior's sample space"
    pixel = "RGB pixels"


class Init(Enum):
    randn = "N(0, 1) in parameter space"
    zeros = "zeros (mid-gray pixels)"
    image = "an image file (target.init_image)"
    denoised = "the prior's one-step x0 prediction from pure noise (CFG 7.5)"
    samples = "exact samples of each image's prompt (priors with a true distribution: prior=analytic)"


class View(Enum):
    front = "front"
    side = "side"
    back = "back"
    overhead = "overhead"


def check_init(config: Any, prior_type: type) -> None:
    """Refuse ``target.init=samples`` for a prior (class) without a true distribution; called before anything is
    built (``runner.check_run``) and again by the target."""
    if getattr(config, "init", None) == Init.samples and not getattr(prior_type, "has_true_distribution", False):
        raise ValueError(f"target.init=samples needs a prior with a true distribution (prior=analytic); "
                         f"{prior_type.__name__} has none: use target.init=randn, zeros, image or denoised")


@dataclass
class ImageTargetConfig(TargetConfig):
    parameterization: Parameterization = Parameterization.auto
    init: Init = Init.randn
    init_image: Optional[str] = None
    init_scale: float = 1.0  # multiplies randn init
    init_cfg: float = 7.5  # CFG scale of the denoised init (the SDI notebook uses 7.5)
    resolution: Optional[int] = None  # pixel side for the pixel parameterization; default: the prior's image size
    view: Optional[View] = None  # every text seen from this view: "<prompt>, <view> view" (threestudio's 2D notebooks)

    def __post_init__(self) -> None:
        if self.init == Init.image and not self.init_image:
            raise ValueError("target.init=image needs target.init_image=<path to an image file>")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"target.resolution={self.resolution} must be >= 8")

    def protocol_fields(self) -> dict[str, Any]:
        return {"resolution": self.resolution}

    def view_prompting(self) -> ViewPrompting:
        return ViewPrompting(fixed_view=None if self.view is None else self.view.value)


@builds("target", "image", ImageTargetConfig)
class ImageTarget(Target):
    def __init__(
        self,
        config: ImageTargetConfig,
        prior: DiffusionPrior,
        num_images: int,
        generator: torch.Generator,
        prompts: list[str] | None = None,
    ):
        super().__init__()
        if num_images < 1:
            raise ValueError("the image target needs at least one image (the prompt list is empty)")
        self.config = config
        attach_prior(self, prior)
        param = config.parameterization
        if param == Parameterization.auto:
            param = Parameterization.latent if prior.is_latent else Parameterization.pixel
        self.parameterization = param
        if param == Parameterization.latent:
            shape = (num_images, *prior.sample_shape)
        else:
            side = config.resolution or prior.image_size
            shape = (num_images, 3, side, side)
        self._initial_noise: torch.Tensor | None = None
        self.param = nn.Parameter(self._initial(shape, generator, prompts).to(prior.device))

    def initial_noise(self) -> torch.Tensor | None:
        return self._initial_noise

    @torch.no_grad()
    def _initial(self, shape: tuple[int, ...], generator: torch.Generator, prompts: list[str] | None) -> torch.Tensor:
        cfg = self.config
        if cfg.init == Init.denoised:  # the one-step x0 prediction from x_T at t = T - 1 (the SDI notebook)
            from sdbridge.sampling import guided_eps

            texts = prompts or [""] * shape[0]
            x_T = self.prior.sample_x_T(list(texts), generator).to(self.prior.device)
            t = torch.full((shape[0],), self.prior.num_train_timesteps - 1, device=self.prior.device)
            eps = guided_eps(self.prior, x_T, t, list(cfg.view_prompting().resolve(texts)), cfg.init_cfg, "")
            x0 = self.prior.eps_to_x0(eps, x_T, t)
            if self.parameterization == Parameterization.latent:
                self._initial_noise = eps.cpu()
            return self._from_model_space(x0, shape)
        if cfg.init == Init.samples:  # what a method does to images that already are the truth
            check_init(cfg, type(self.prior))
            texts = list(cfg.view_prompting().resolve(prompts or [""] * shape[0]))
            x0 = torch.cat([self.prior.sample(text, 1, generator) for text in texts]).to(self.prior.device)
            return self._from_model_space(x0, shape)
        if cfg.init == Init.randn:
            return rng.randn(shape, generator) * cfg.init_scale
        if cfg.init == Init.zeros:
            return torch.zeros(shape)
        image = load_image(cfg.init_image, size=self.prior.image_size if self.parameterization == Parameterization.latent
                           else shape[-1])
        images = image[None].expand(shape[0], -1, -1, -1).to(self.prior.device)
        if self.parameterization == Parameterization.latent:
            return self.prior.encode(images).cpu()
        return (2 * images - 1).cpu()

    def _from_model_space(self, x0: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The parameter that renders the prior's sample-space images ``x0``."""
        if self.parameterization == Parameterization.latent:
            return x0.cpu()
        pixels = 2 * self.prior.decode(x0) - 1 if self.prior.is_latent else x0
        if pixels.shape[-2:] != shape[-2:]:
            pixels = F.interpolate(pixels, shape[-2:], mode="bilinear", antialias=True)
        return pixels.cpu()

    def forward(self, batch: dict[str, Any] | None = None) -> Render:
        if self.parameterization == Parameterization.latent:
            return Render(x0=self.param)
        return Render(images=(self.param + 1) / 2)

    @torch.no_grad()
    def model_samples(self) -> torch.Tensor:
        render = self.forward()
        return render.x0.detach() if render.x0 is not None else self.prior.encode(render.images)

    @torch.no_grad()
    def preview(self) -> torch.Tensor:
        if self.parameterization == Parameterization.latent:
            return torch.cat([self.prior.decode(x) for x in self.param.split(8)]).cpu()
        return ((self.param.clamp(-1, 1) + 1) / 2).cpu()

    def export(self, directory: Path, names: list[str]) -> list[Path]:
        """One PNG per image, ``{index:03d}_{prompt slug}.png``, and ``grid.png`` beside them."""
        images = self.preview()
        directory = Path(directory)
        paths = [save_png(img, directory / f"{i:03d}_{slug(n)}.png") for i, (img, n) in enumerate(zip(images, names))]
        save_png(make_grid(images), directory / "grid.png")
        return paths
