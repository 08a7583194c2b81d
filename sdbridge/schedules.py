"""Timestep schedules: which diffusion time ``t`` each sample is noised to at a given optimization step.

Every schedule draws from the run's one seeded ``torch.Generator`` (kept on the CPU, so the same seed gives the
same timesteps on any device) and returns integer timesteps of shape ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from sdbridge import rng
from sdbridge.priors.base import NUM_TRAIN_TIMESTEPS
from sdbridge.registry import build, builds


@dataclass
class ScheduleConfig:
    """Range of t as fractions of the 1000 training steps, and whether each sample draws its own t."""

    min_step_ratio: float = 0.02
    max_step_ratio: float = 0.98
    per_sample: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_step_ratio <= self.max_step_ratio <= 1.0:
            raise ValueError(
                f"scheduler.min_step_ratio={self.min_step_ratio} and scheduler.max_step_ratio={self.max_step_ratio} "
                "must satisfy 0 <= min_step_ratio <= max_step_ratio <= 1"
            )


@dataclass
class UniformConfig(ScheduleConfig):
    """t ~ U{min_step, ..., max_step} with min_step = int(min_step_ratio * 1000), max_step = int(max_step_ratio *
    1000)."""


@dataclass
class DDIMGridConfig(ScheduleConfig):
    """t uniform on a DDIM inference grid restricted to [min_step, max_step].

    The Bridge paper's 2D code (davidmcall/SDS-Bridge) samples t from the 500-step DDIM grid (``steps_offset=1``:
    1, 3, ..., 999) restricted to ratios [0.02, 0.98], i.e. t in {21, 23, ..., 979}.
    """

    num_inference_steps: int = 500
    steps_offset: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.num_inference_steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"scheduler.num_inference_steps={self.num_inference_steps} must be in [1, 1000]")


@dataclass
class AnnealConfig(ScheduleConfig):
    """Deterministic linear anneal, one t for the whole batch (SDI, Lukoianov et al. 2024):
    ``t(i) = int(1000 * ((max_step_ratio - min_step_ratio) * (1 - i / N) + min_step_ratio))`` with N = ``steps``, by
    default the trainer's real max_steps (the SDI code reads its own ``trainer_max_steps`` field instead, a pitfall
    avoided here). The SDI notebook anneals over N = 1000 and runs 1001 iterations (steps 0..1000), so its last step
    is at t = 20: ``scheduler.steps=1000 trainer.max_steps=1001`` (``guidance=sdi_cached`` sets both)."""

    per_sample: bool = False
    steps: Optional[int] = None  # N of the anneal; None: the trainer's max_steps

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"scheduler.steps={self.steps} must be >= 1 (or null: the trainer's max_steps)")


@dataclass
class StagedConfig(ScheduleConfig):
    """Uniform t whose range changes at given steps: from ``switch_steps[i]`` on, t ~ U[min_ratios[i], max_ratios[i]]
    (the Bridge paper's 3D schedule: [0.02, 0.98] until step 5000, then [0.02, 0.5]). Before the first switch step the
    base ``min_step_ratio`` / ``max_step_ratio`` apply."""

    switch_steps: list[int] = field(default_factory=lambda: [5000])
    min_ratios: list[float] = field(default_factory=lambda: [0.02])
    max_ratios: list[float] = field(default_factory=lambda: [0.5])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not len(self.switch_steps) == len(self.min_ratios) == len(self.max_ratios):
            raise ValueError("scheduler.switch_steps, min_ratios and max_ratios must have the same length")
        if list(self.switch_steps) != sorted(self.switch_steps):
            raise ValueError(f"scheduler.switch_steps={list(self.switch_steps)} must be increasing")
        for lo, hi in zip(self.min_ratios, self.max_ratios):
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"scheduler stage range [{lo}, {hi}] must satisfy 0 <= min <= max <= 1")


@dataclass
class DreamTimeConfig(ScheduleConfig):
    """DreamTime-style monotone decreasing t (Huang et al., ICLR 2024): t(i) is where the cumulative prior weight
    W(t) = exp(-(t - m)^2 / (2 s^2)), integrated from t_max down, reaches i / N, so the run spends most steps
    around t = m. One t for the batch."""

    per_sample: bool = False
    center: float = 500.0  # m
    spread: float = 250.0  # s

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.spread > 0:
            raise ValueError(f"scheduler.spread={self.spread} must be > 0")


@dataclass
class ShrinkingMaxConfig(ScheduleConfig):
    """LucidDreamer's t schedule (EnVision-Research/LucidDreamer at commit 2ecf093, ``guidance/sd_utils.py``
    ``StableDiffusion.__init__`` and ``train_step``; ``train.py`` ``warm_up_rate``), one t for the batch:
    ``t = index_offset + randint(min_step, max_step + int(warmup_step * rate))`` (upper end exclusive) with
    ``min_step = int(1000 min_step_ratio)``, ``max_step = int(1000 max_step_ratio)``,
    ``warmup_step = int(1000 (max_step_ratio_start - max_step_ratio))`` and ``rate = warmup_rate(step, warmup_steps)``:
    the upper end falls linearly from ``max_step_ratio_start`` to ``max_step_ratio`` over the first ``warmup_steps``
    steps. Official values: t_range [0.02, 0.5], max_t_range 0.98, warmup_iter 1500: t in {21..980} at the start,
    {21..500} from step 1499 on."""

    min_step_ratio: float = 0.02  # t_range[0]
    max_step_ratio: float = 0.5  # t_range[1]: the upper end after the warm-up
    max_step_ratio_start: float = 0.98  # max_t_range: the upper end at the start of the warm-up
    warmup_steps: int = 1500  # OptimizationParams.warmup_iter (0: no warm-up, the upper end is max_step_ratio)
    index_offset: int = 1  # the official draw is an index into DDIM's timesteps 1..1000: index i is timestep i + 1
    per_sample: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.max_step_ratio <= self.max_step_ratio_start <= 1.0:
            raise ValueError(f"scheduler.max_step_ratio_start={self.max_step_ratio_start} must be in "
                             f"[max_step_ratio={self.max_step_ratio}, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"scheduler.warmup_steps={self.warmup_steps} must be >= 0")
        if self.index_offset not in (0, 1):
            raise ValueError(f"scheduler.index_offset={self.index_offset} must be 0 or 1")
        if int(NUM_TRAIN_TIMESTEPS * self.min_step_ratio) + self.index_offset > NUM_TRAIN_TIMESTEPS - 1:
            raise ValueError(f"scheduler.min_step_ratio={self.min_step_ratio} leaves no timestep below "
                             f"{NUM_TRAIN_TIMESTEPS}")


def warmup_rate(step: int, warmup_steps: int) -> float:
    """LucidDreamer's ``warm_up_rate = 1 - min(iteration / warmup_iter, 1)``, from 1 down to 0 (``train.py``).
    Its iterations count from 1, sdbridge's steps from 0: step k is its iteration k + 1. No warm-up: 0."""
    if warmup_steps <= 0:
        return 0.0
    return 1.0 - min((step + 1) / warmup_steps, 1.0)


class TimestepSchedule:
    """Base: uniform sampling over a set of allowed timesteps (subclasses choose the set)."""

    def __init__(self, config: ScheduleConfig, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.config = config
        self.num_train_timesteps = num_train_timesteps
        self.max_steps = 1

    def setup(self, max_steps: int) -> None:
        """Called once the trainer's real ``max_steps`` is known (annealed schedules depend on it)."""
        self.max_steps = max(1, int(max_steps))
        self.__dict__.pop("_cached", None)  # annealed sets depend on max_steps

    @property
    def min_step(self) -> int:
        return int(self.num_train_timesteps * self.config.min_step_ratio)

    @property
    def max_step(self) -> int:
        return min(int(self.num_train_timesteps * self.config.max_step_ratio), self.num_train_timesteps - 1)

    def candidates(self, step: int) -> torch.Tensor:
        return torch.arange(self.min_step, self.max_step + 1)

    def _candidates(self, step: int) -> torch.Tensor:
        """:meth:`candidates`, rebuilt only when :meth:`cache_key` changes: a step-independent set (uniform, DDIM
        grid) or a staged one between switches is built once instead of at every step (~0.05 ms of Python a step)."""
        key = self.cache_key(step)
        if not hasattr(self, "_cached") or key != self._cached_key:
            self._cached, self._cached_key = self.candidates(step), key
        return self._cached

    def cache_key(self, step: int) -> object:
        """What :meth:`candidates` depends on besides the config: the step itself unless a subclass knows better."""
        return step

    def __call__(self, step: int, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
        cand = self._candidates(step)
        idx = rng.randint(len(cand), batch_size, generator, shared=not self.config.per_sample)
        return cand[idx]


@builds("scheduler", "uniform", UniformConfig)
class UniformSchedule(TimestepSchedule):
    def cache_key(self, step: int) -> object:
        return None  # the same set at every step


@builds("scheduler", "ddim_grid", DDIMGridConfig)
class DDIMGridSchedule(TimestepSchedule):
    def cache_key(self, step: int) -> object:
        return None

    def candidates(self, step: int) -> torch.Tensor:
        ratio = self.num_train_timesteps // self.config.num_inference_steps
        grid = torch.arange(0, self.config.num_inference_steps) * ratio + self.config.steps_offset
        keep = (grid >= self.min_step) & (grid <= self.max_step)
        if not keep.any():
            raise ValueError(f"no DDIM grid timestep lies in [{self.min_step}, {self.max_step}]")
        return grid[keep]


@builds("scheduler", "anneal", AnnealConfig)
class AnnealSchedule(TimestepSchedule):
    def candidates(self, step: int) -> torch.Tensor:
        c = self.config
        n = c.steps or self.max_steps
        frac = min(max(step, 0), n) / n
        t = int(self.num_train_timesteps * ((c.max_step_ratio - c.min_step_ratio) * (1 - frac) + c.min_step_ratio))
        return torch.tensor([min(t, self.num_train_timesteps - 1)])


@builds("scheduler", "staged", StagedConfig)
class StagedSchedule(TimestepSchedule):
    def cache_key(self, step: int) -> object:
        return sum(step >= switch for switch in self.config.switch_steps)

    def candidates(self, step: int) -> torch.Tensor:
        c = self.config
        lo, hi = c.min_step_ratio, c.max_step_ratio
        for switch, a, b in zip(c.switch_steps, c.min_ratios, c.max_ratios):
            if step >= switch:
                lo, hi = a, b
        n = self.num_train_timesteps
        return torch.arange(int(n * lo), min(int(n * hi), n - 1) + 1)


@builds("scheduler", "dreamtime", DreamTimeConfig)
class DreamTimeSchedule(TimestepSchedule):
    def candidates(self, step: int) -> torch.Tensor:
        c = self.config
        ts = torch.arange(self.min_step, self.max_step + 1, dtype=torch.float64)
        w = torch.exp(-((ts - c.center) ** 2) / (2 * c.spread**2))
        tail = torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0])  # weight of [t, t_max]
        tail = tail / tail[0]
        frac = min(max(step, 0), self.max_steps) / self.max_steps
        idx = int(torch.searchsorted(-tail, torch.tensor(-frac, dtype=torch.float64)).clamp(max=len(ts) - 1))
        return ts[idx : idx + 1].long()


@builds("scheduler", "shrinking_max", ShrinkingMaxConfig)
class ShrinkingMaxSchedule(TimestepSchedule):
    def candidates(self, step: int) -> torch.Tensor:
        c = self.config
        n = self.num_train_timesteps
        warmup_step = int(n * (c.max_step_ratio_start - c.max_step_ratio))
        high = int(n * c.max_step_ratio) + int(warmup_step * warmup_rate(step, c.warmup_steps))  # exclusive
        low = int(n * c.min_step_ratio)
        t = torch.arange(low, max(high, low + 1)) + c.index_offset
        return t[t <= n - 1]




def build_schedule(config: ScheduleConfig, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> TimestepSchedule:
    return build(config, num_train_timesteps)
