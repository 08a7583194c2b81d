"""The radiance field: hash-grid features -> density (with a blob prior) and albedo, inside a bounded sphere.

Points live in world units inside the sphere of radius ``radius`` (the official 3D settings: 2); the encoding sees
them mapped to ``[0, 1]^3``. Density ``sigma = softplus(raw + blob(x) - 1)`` (threestudio's "shifted softplus"),
with Magic3D's blob ``scale * (1 - |x| / std)`` (scale 10, std 0.5 officially): a dense ball of radius ``std`` at
the start, so the first renders show an object rather than fog. Albedo is a sigmoid head on the same features.

Normals are ``-grad sigma / |grad sigma|``, either by autograd (``analytic``; differentiable, so the orientation
loss trains the density) or by central finite differences of step ``normal_eps`` (``finite_difference``: 6 extra
density evaluations, no double backward).
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from sdbridge.targets.nerf.encoding import HashGrid, HashGridConfig


class NormalType(Enum):
    analytic = "autograd gradient of the density"
    finite_difference = "central differences of the density"


@dataclass
class FieldConfig:
    radius: float = 2.0  # bounded scene: the sphere every ray is clipped to
    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    hidden_dim: int = 64
    hidden_layers: int = 1
    blob_scale: float = 10.0  # Magic3D density blob (threestudio "blob_magic3d"); 0 disables it
    blob_std: float = 0.5
    normal_type: NormalType = NormalType.finite_difference
    normal_eps: float = 0.01  # finite-difference step, world units

    def __post_init__(self) -> None:
        if not self.radius > 0:
            raise ValueError(f"target.field.radius={self.radius} must be > 0")
        if self.hidden_dim < 1 or self.hidden_layers < 0:
            raise ValueError("target.field.hidden_dim must be >= 1 and hidden_layers >= 0")
        if not self.blob_std > 0:
            raise ValueError(f"target.field.blob_std={self.blob_std} must be > 0")
        if not self.normal_eps > 0:
            raise ValueError(f"target.field.normal_eps={self.normal_eps} must be > 0")


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int) -> nn.Sequential:
    dims = [in_dim, *([hidden] * layers), out_dim]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1], bias=i < len(dims) - 2))
        if i < len(dims) - 2:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class RadianceField(nn.Module):
    def __init__(self, config: FieldConfig):
        super().__init__()
        self.config = config
        self.encoding = HashGrid(config.encoding)
        self.density_net = mlp(self.encoding.output_dim, 1, config.hidden_dim, config.hidden_layers)
        self.albedo_net = mlp(self.encoding.output_dim, 3, config.hidden_dim, config.hidden_layers)

    def set_step(self, step: int) -> None:
        self.encoding.set_step(step)

    def blob(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.blob_scale == 0:
            return x.new_zeros(x.shape[:-1])
        return c.blob_scale * (1 - x.norm(dim=-1) / c.blob_std)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding((x / self.config.radius + 1) / 2)

    def density_from(self, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Density of points ``x`` whose encoded features are ``feats`` (the blob-shifted softplus)."""
        return F.softplus(self.density_net(feats).squeeze(-1) + self.blob(x) - 1)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` world points -> ``(N,)`` density."""
        return self.density_from(self.features(x), x)

    def forward(self, x: torch.Tensor, with_normals: bool = False) -> dict[str, torch.Tensor]:
        """``(N, 3)`` points -> ``density (N,)``, ``albedo (N, 3)`` in [0, 1] and, if asked, unit ``normals (N, 3)``."""
        analytic = with_normals and self.config.normal_type == NormalType.analytic
        if analytic:
            x = x.detach().requires_grad_(True)
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad() if analytic else contextlib.nullcontext():
            feats = self.features(x)
            sigma = self.density_from(feats, x)
            out = {"density": sigma, "albedo": torch.sigmoid(self.albedo_net(feats))}
            if analytic:
                grad = torch.autograd.grad(sigma.sum(), x, create_graph=outer_grad)[0]
                out["normals"] = -F.normalize(grad, dim=-1, eps=1e-8)
                if not outer_grad:  # evaluation: the graph was only needed for the normals
                    out = {k: v.detach() for k, v in out.items()}
        if with_normals and not analytic:
            out["normals"] = self.finite_difference_normals(x)
        return out

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` points -> unit normals alone (the configured kind; finite differences skip density and albedo
        at x itself): what evaluation renders ask for at the samples that show."""
        if self.config.normal_type == NormalType.analytic:
            return self(x, with_normals=True)["normals"]
        return self.finite_difference_normals(x)

    def finite_difference_normals(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.config.normal_eps
        offsets = torch.eye(3, device=x.device, dtype=x.dtype) * eps  # (3, 3)
        pts = torch.cat([x[:, None, :] + offsets, x[:, None, :] - offsets], dim=1)  # (N, 6, 3)
        sigma = self.density(pts.reshape(-1, 3)).view(-1, 2, 3)
        grad = (sigma[:, 0] - sigma[:, 1]) / (2 * eps)
        return -F.normalize(grad, dim=-1, eps=1e-8)

