"""Multiresolution hash-grid encoding (Instant-NGP, Müller et al. 2022) in pure PyTorch, tinycudann when importable.

Level ``l`` of ``L`` has resolution ``floor(base * b^l)`` with ``b = exp((ln max_res - ln base) / (L - 1))``; a level
whose ``(res + 1)^3`` grid points fit in the table of ``2^log2_table`` entries is indexed densely, a finer one
through the spatial hash ``x * 1 ^ y * 2654435761 ^ z * 805459861 mod T`` (the Instant-NGP primes). Each point gets
the trilinear interpolation of its cell's 8 corner features at every level, concatenated: ``(N, L * F)``.

**Progressive levels** (Magic3D / threestudio's ``ProgressiveBandHashGrid``): only the first ``start_level`` levels
are used at first; from ``start_step`` one more level is unmasked every ``update_steps`` steps. Masked levels output
zeros (their parameters get no gradient), so the field starts smooth and gains detail as training goes.

The official 3D settings (threestudio ``sdi.yaml``): 16 levels, 2 features, log2 table 19, base res 16, max res
4096 (per-level scale 1.447), start level 8 at step 2000, +1 level every 500 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

_PRIMES = (1, 2654435761, 805459861)


@dataclass
class HashGridConfig:
    levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 4096
    start_level: int = 8  # levels in use before start_step (progressive unmasking)
    start_step: int = 2000
    update_steps: int = 500  # one more level every this many steps after start_step
    backend: str = "auto"  # auto (tinycudann when importable and on CUDA) | torch

    def __post_init__(self) -> None:
        if self.levels < 1 or self.features_per_level < 1:
            raise ValueError("target.field.encoding.levels and features_per_level must be >= 1")
        if not 8 <= self.log2_table_size <= 24:
            raise ValueError(f"target.field.encoding.log2_table_size={self.log2_table_size} must be in [8, 24]")
        if not 2 <= self.base_resolution <= self.max_resolution:
            raise ValueError("target.field.encoding needs 2 <= base_resolution <= max_resolution")
        if not 1 <= self.start_level <= self.levels:
            raise ValueError(f"target.field.encoding.start_level={self.start_level} must be in [1, levels]")
        if self.update_steps < 1 or self.start_step < 0:
            raise ValueError("target.field.encoding.update_steps must be >= 1 and start_step >= 0")
        if self.backend not in ("auto", "torch"):
            raise ValueError(f"target.field.encoding.backend={self.backend!r} must be one of ['auto', 'torch']")

    @property
    def per_level_scale(self) -> float:
        if self.levels == 1:
            return 1.0
        return math.exp((math.log(self.max_resolution) - math.log(self.base_resolution)) / (self.levels - 1))

    def active_levels(self, step: int) -> int:
        if step < self.start_step:
            return self.start_level
        return min(self.levels, self.start_level + 1 + (step - self.start_step) // self.update_steps)


def tinycudann_available() -> bool:
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return False
    return torch.cuda.is_available()


class HashGrid(nn.Module):
    """``forward(x)`` with ``x`` in ``[0, 1]^3`` of shape ``(N, 3)`` -> ``(N, levels * features_per_level)``."""

    def __init__(self, config: HashGridConfig):
        super().__init__()
        self.config = config
        self.output_dim = config.levels * config.features_per_level
        self.table_size = 2**config.log2_table_size
        scale = config.per_level_scale
        res = [int(math.floor(config.base_resolution * scale**level + 1e-6)) for level in range(config.levels)]
        self.resolutions = res
        # rows actually used per level: dense levels need only (res + 1)^3 entries (tinycudann does the same)
        self.level_sizes = [min(self.table_size, (r + 1) ** 3) for r in res]
        offsets = [0]
        for size in self.level_sizes:
            offsets.append(offsets[-1] + size)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int32), persistent=False)
        self.embeddings = nn.Parameter(torch.empty(offsets[-1], config.features_per_level).uniform_(-1e-4, 1e-4))
        self.register_buffer("level_mask", torch.ones(config.levels), persistent=False)
        self.register_buffer("res", torch.tensor(res, dtype=torch.float32), persistent=False)
        dense = [(r + 1) ** 3 <= self.table_size for r in res]
        self.num_dense = sum(dense)  # dense levels are the coarse prefix: resolutions increase
        # int32 index arithmetic (half the memory traffic of int64): products wrap mod 2^32 exactly like the uint32
        # hash of Instant-NGP, and the low log2_table_size bits kept by the mask are the same
        primes = [p - 2**32 if p >= 2**31 else p for p in _PRIMES]
        mult = [[(r + 1) ** 2, r + 1, 1] if d else primes for r, d in zip(res, dense)]
        self.register_buffer("multipliers", torch.tensor(mult, dtype=torch.int32), persistent=False)
        self.tcnn = None
        if config.backend == "auto" and tinycudann_available():  # pragma: no cover - needs CUDA + tinycudann
            import tinycudann as tcnn

            self.tcnn = tcnn.Encoding(
                3,
                {
                    "otype": "HashGrid",
                    "n_levels": config.levels,
                    "n_features_per_level": config.features_per_level,
                    "log2_hashmap_size": config.log2_table_size,
                    "base_resolution": config.base_resolution,
                    "per_level_scale": scale,
                },
                dtype=torch.float32,
            )

    def set_step(self, step: int) -> None:
        """Unmask levels progressively (see the module docstring)."""
        active = self.config.active_levels(step)
        self.level_mask.zero_()
        self.level_mask[:active] = 1

    @property
    def active(self) -> int:
        return int(self.level_mask.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L, F = self.config.levels, self.config.features_per_level
        if self.tcnn is not None and x.is_cuda:  # pragma: no cover - needs CUDA + tinycudann
            out = self.tcnn(x.clamp(0, 1)).float()
            return (out.view(-1, L, F) * self.level_mask[:, None]).flatten(1)
        active = self.active
        n = x.shape[0]
        x = x.clamp(0, 1)
        res = self.res[:active]  # (A,)
        pos = x[:, None, :] * res[None, :, None]  # (N, A, 3)
        base = torch.minimum(pos.floor(), (res - 1)[None, :, None])
        frac = pos - base
        # per-axis index terms of the cell's two corners: dense levels (a prefix: the coarse ones) add strides,
        # hashed ones XOR primes and wrap with a mask (the table size is a power of two)
        corner = base.int()[..., None] + torch.arange(2, device=x.device, dtype=torch.int32)  # (N, A, 3, 2)
        terms = corner * self.multipliers[:active, :, None]
        tx, ty, tz = terms[:, :, 0, :, None, None], terms[:, :, 1, None, :, None], terms[:, :, 2, None, None, :]
        d = min(self.num_dense, active)
        parts = []
        if d > 0:
            parts.append(tx[:, :d] + ty[:, :d] + tz[:, :d])
        if d < active:
            parts.append((tx[:, d:] ^ ty[:, d:] ^ tz[:, d:]) & (self.table_size - 1))
        idx = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (N, A, 2, 2, 2)
        idx = (idx + self.offsets[:active, None, None, None]).reshape(n * active, 8)
        w = torch.stack([1 - frac, frac], dim=-1)  # (N, A, 3, 2)
        weights = (w[:, :, 0, :, None, None] * w[:, :, 1, None, :, None] * w[:, :, 2, None, None, :]).reshape(-1, 8)
        # one gather for every point, level and corner (index_select: the fastest gather/scatter pair on CPU)
        feats = self.embeddings.index_select(0, idx.flatten().long()).view(-1, 8, F)
        out = (feats * weights[..., None]).sum(1).view(n, active * F)
        if active < L:
            out = torch.cat([out, out.new_zeros(n, (L - active) * F)], dim=1)
        return out
