"""The NeRF target: one scene, rendered from random cameras each step, guided with view-dependent prompts.

``forward(batch)`` renders the batch's cameras at the resolution the schedule gives for the step (e.g. 64 until
step 5000, then 512), resizes the renders to the prior's image size (512 for SD, whose VAE then encodes them; the
pixel size of a pixel prior) and returns them with the cameras (:class:`~sdbridge.views.Views`); the guidance
turns the prompt into ``"<prompt>, <front|side|back|overhead> view"`` per camera (DreamFusion; Perp-Neg with
``perp_neg=true``) as :meth:`NeRFTargetConfig.view_prompting` says. The render's opacity, depth variance and
normals feed the regularizers of the same step.

Outputs (``export``): ``images/final/`` holds a front view per prompt, ``grid.png`` (rgb / normal / opacity rows
of four views), ``turntable.mp4`` and ``mesh.ply`` / ``mesh.obj`` (marching cubes with vertex colors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from dataclasses import field as dfield
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from sdbridge.media import make_grid, save_png, slug, write_video
from sdbridge.priors.base import DiffusionPrior, attach_prior
from sdbridge.targets.base import Render, Target, TargetConfig
from sdbridge.targets.nerf.cameras import (
    CameraConfig,
    CameraDataModule,
    camera_rays,
    turntable_cameras,
)
from sdbridge.targets.nerf.export import extract_mesh, write_obj, write_ply
from sdbridge.targets.nerf.field import FieldConfig, RadianceField
from sdbridge.targets.nerf.regularizers import RegularizerConfig, normal_colors, regularizer_losses
from sdbridge.views import ViewPrompting, Views
from sdbridge.targets.nerf.renderer import (
    BackgroundKind,
    RendererConfig,
    Shading,
    VolumeRenderer,
    pick_shading,
    with_lights,
)
from sdbridge.registry import builds

log = logging.getLogger("sdbridge")


class ViewScheme(Enum):
    threestudio = "the suffix of the camera's view direction, threestudio's Perp-Neg"
    luciddreamer = "the interpolated embeddings of the two nearest views, LucidDreamer's Perp-Neg"


@dataclass
class NeRFTargetConfig(TargetConfig):
    field: FieldConfig = dfield(default_factory=FieldConfig)
    renderer: RendererConfig = dfield(default_factory=RendererConfig)
    cameras: CameraConfig = dfield(default_factory=CameraConfig)
    regularizers: RegularizerConfig = dfield(default_factory=RegularizerConfig)
    resolutions: list[int] = dfield(default_factory=lambda: [64])  # render side, one per stage
    resolution_milestones: list[int] = dfield(default_factory=list)  # steps where the next resolution starts
    eval_resolution: int = 64  # validation grids, turntable video
    view_dependent_prompts: bool = True
    perp_neg: bool = False  # Perp-Neg view prompting (sdbridge/views.py): 2 more conditionings/sample (3 on the exact prior)
    front_threshold: float = 45.0  # degrees of azimuth around 0 that are "front" (threestudio: 45; ProlificDreamer 30)
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0  # elevation above which a view is "overhead"
    view_scheme: ViewScheme = ViewScheme.threestudio  # how a camera becomes texts (sdbridge/views.py)
    random_flip: float = 0.0  # probability of mirroring a step's renders left-right (LucidDreamer's augmentation: 0.5)
    mlp_lr: Optional[float] = None  # the density/albedo MLPs' learning rate (None: optimizer.lr; ProlificDreamer 0.001)
    background_lr: Optional[float] = 0.001  # the env-map network's learning rate (None: the field's)
    mesh_resolution: int = 128  # marching-cubes grid (0: no mesh export)
    mesh_threshold: float = 5.0

    def __post_init__(self) -> None:
        if len(self.resolutions) != len(self.resolution_milestones) + 1:
            raise ValueError(
                f"target.resolutions={list(self.resolutions)} needs exactly one more entry than "
                f"target.resolution_milestones={list(self.resolution_milestones)}"
            )
        if any(r < 8 for r in self.resolutions) or self.eval_resolution < 8:
            raise ValueError("target.resolutions and target.eval_resolution must be >= 8")
        if list(self.resolution_milestones) != sorted(set(self.resolution_milestones)):
            raise ValueError(f"target.resolution_milestones={list(self.resolution_milestones)} must increase")
        if self.perp_neg and not self.view_dependent_prompts:
            raise ValueError("target.perp_neg=true needs target.view_dependent_prompts=true")
        if not 0 <= self.random_flip <= 1:
            raise ValueError(f"target.random_flip={self.random_flip} must be a probability in [0, 1]")
        if self.mesh_resolution != 0 and self.mesh_resolution < 16:
            raise ValueError(f"target.mesh_resolution={self.mesh_resolution} must be 0 (off) or >= 16")
        if self.background_lr is not None and not self.background_lr > 0:
            raise ValueError(f"target.background_lr={self.background_lr} must be > 0")

    def resolution(self, step: int) -> int:
        stage = sum(step >= m for m in self.resolution_milestones)
        return int(self.resolutions[stage])

    def view_prompting(self) -> ViewPrompting:
        return ViewPrompting(self.view_dependent_prompts, self.perp_neg, self.front_threshold, self.back_threshold,
                             self.overhead_threshold, scheme=self.view_scheme.name)

    def protocol_fields(self) -> dict[str, Any]:
        return {"resolutions": list(self.resolutions), "resolution_milestones": list(self.resolution_milestones),
                "eval_resolution": self.eval_resolution, "eval_views": self.cameras.eval_views}


@builds("target", "nerf", NeRFTargetConfig)
class NeRFTarget(Target):
    def __init__(
        self,
        config: NeRFTargetConfig,
        prior: DiffusionPrior,
        num_images: int,
        generator: torch.Generator,
        prompts: list[str] | None = None,
    ):
        super().__init__()
        prompts = list(prompts or [""])
        if len(set(prompts)) != 1:
            raise ValueError(
                f"target=nerf optimizes one scene for one prompt; got {len(set(prompts))} different prompts "
                f"({sorted(set(prompts))[:3]}...). Set prompt.text=\"...\" (prompt.repeat does not apply)"
            )
        self.config = config
        attach_prior(self, prior)
        self.prompt = prompts[0]
        self.seed = generator.initial_seed()
        with torch.random.fork_rng():  # initial weights from the run's seed, without drawing from its generator
            torch.manual_seed(self.seed)
            self.field = RadianceField(config.field)
            self.renderer = VolumeRenderer(config.renderer, self.field)
        self.to(prior.device)
        self._last: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ training
    def datamodule(self) -> CameraDataModule:
        return CameraDataModule(self.config.cameras, self.seed)

    def guidance_prompts(self, prompts: list[str]) -> list[str]:
        """The scene's prompt (the guidance adds the view suffixes of :meth:`NeRFTargetConfig.view_prompting`)."""
        return [self.prompt]

    def to_prior_size(self, images: torch.Tensor) -> torch.Tensor:
        size = self.prior.image_size
        if images.shape[-1] == size:
            return images
        return F.interpolate(images, (size, size), mode="bilinear", align_corners=False,
                             antialias=images.shape[-1] > size)

    def forward(self, batch: dict[str, Any]) -> Render:
        step = int(batch["step"])
        self.field.set_step(step)
        side = self.config.resolution(step)
        generator = torch.Generator().manual_seed(int(batch["render_seed"]))
        shading = pick_shading(self.config.renderer.shading, step, generator)
        r = self.config.renderer
        u, color = torch.rand(1, generator=generator).item(), torch.rand(3, generator=generator)  # always drawn
        background = None
        if r.background == BackgroundKind.random or (r.background == BackgroundKind.envmap
                                                      and u < r.random_background_prob):
            background = color
        device = self.field.encoding.embeddings.device
        c2w = batch["c2w"].to(device)
        origins, dirs = camera_rays(c2w, batch["fovy"].to(device), side, side)
        out = self.renderer(origins, dirs, with_lights(batch, side, side).to(device), shading, generator,
                            need_normals=self.config.regularizers.needs_normals(),
                            background_color=None if background is None else background.to(device))
        self._last = out
        images = out["rgb"].permute(0, 3, 1, 2)
        if self.config.random_flip and torch.rand(1, generator=generator).item() < self.config.random_flip:
            images = images.flip(-1)  # the whole batch, as LucidDreamer's RandomHorizontalFlip on the stacked renders
        views = Views(batch["elevation"].cpu().float(), batch["azimuth"].cpu().float(),
                      batch["distance"].cpu().float(), c2w)
        return Render(images=self.to_prior_size(images), prompts=[self.prompt] * c2w.shape[0], views=views)

    def regularizers(self, step: int) -> dict[str, torch.Tensor]:
        if self._last is None:
            return {}
        weights = {name: w for name, w in self.config.regularizers.weights(step).items() if w != 0}
        losses = regularizer_losses(self._last, self.config.regularizers.convexity_res, names=weights)
        return {name: weights[name] * loss for name, loss in losses.items()}

    def configure_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        background = list(self.renderer.background.parameters()) if self.renderer.background is not None else []
        mlps = [*self.field.density_net.parameters(), *self.field.albedo_net.parameters()]
        groups: list[dict[str, Any]] = [
            {"params": list(self.field.encoding.parameters())},
            {"params": mlps, "lr": c.mlp_lr or c.optimizer.lr},
        ]
        if background:
            groups.append({"params": background, "lr": c.background_lr or c.optimizer.lr})
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no group"
        return c.optimizer.build(groups)

    # ------------------------------------------------------------------ evaluation renders
    @torch.no_grad()
    def render_views(self, cameras: dict[str, Any], side: int, shading: Shading = Shading.albedo,
                     normals: bool = True) -> dict[str, torch.Tensor]:
        """Deterministic renders (bin-centre samples) of ``cameras``: ``rgb``, ``opacity`` and (if ``normals``)
        ``normal`` (in [0, 1]) as ``(V, 3, side, side)`` CPU images."""
        device = self.field.encoding.embeddings.device
        c2w = cameras["c2w"].to(device)
        origins, dirs = camera_rays(c2w, cameras["fovy"].to(device), side, side)
        was_training = self.training
        self.eval()
        try:
            out = self.renderer(origins, dirs, with_lights(cameras, side, side).to(device), shading, None,
                                need_normals=normals)
        finally:
            self.train(was_training)
        to_img = lambda x: x.permute(0, 3, 1, 2).float().cpu()  # noqa: E731
        opacity = out["opacity"][..., None]
        images = {
            "rgb": to_img(out["rgb"]).clamp(0, 1),
            "opacity": to_img(opacity.expand(*out["opacity"].shape, 3)),
        }
        if normals:
            normal = normal_colors(out["normal"], out["opacity"]) + (1 - opacity)  # white where empty
            images["normal"] = to_img(normal).clamp(0, 1)
        return images

    def turntable(self, side: int | None = None, views: int | None = None,
                  normals: bool = True) -> dict[str, torch.Tensor]:
        return self.render_views(turntable_cameras(self.config.cameras, views), side or self.config.eval_resolution,
                                 normals=normals)

    @torch.no_grad()
    def model_samples(self) -> torch.Tensor:
        """Turntable renders at the prior's image size, in model space: what the exact metrics score."""
        rgb = self.turntable(side=self.prior.image_size, normals=False)["rgb"].to(self.prior.device)
        return self.prior.encode(rgb)

    def sample_prompts(self, prompts: list[str]) -> list[str]:
        return [self.prompt] * self.config.cameras.eval_views

    @torch.no_grad()
    def preview(self) -> torch.Tensor:
        """Rows rgb / normal / opacity of four turntable views (a validation grid)."""
        views = self.turntable(views=4)
        return torch.cat([views["rgb"], views["normal"], views["opacity"]])

    def export(self, directory: Path, names: list[str]) -> list[Path]:
        directory = Path(directory)
        frames = self.turntable()
        paths = [save_png(frames["rgb"][0], directory / f"000_{slug(self.prompt)}.png")]
        save_png(make_grid(self.preview(), nrow=4), directory / "grid.png")
        rows = torch.cat([frames["rgb"], frames["normal"]], dim=-1)  # rgb | normal side by side
        paths.append(write_video([(f.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for f in rows],
                                 directory / "turntable.mp4", fps=15))
        if self.config.mesh_resolution:
            try:
                mesh = extract_mesh(self.field, self.config.mesh_resolution, self.config.mesh_threshold)
            except ValueError as err:
                log.warning("sdbridge: mesh export skipped: %s", err)
            else:
                paths += [write_ply(directory / "mesh.ply", *mesh), write_obj(directory / "mesh.obj", *mesh)]
        return paths
