"""Typed run configuration, registered in Hydra's ConfigStore.

Every config group option in ``conf/<group>/<name>.yaml`` starts from a dataclass schema, registered where its class
is defined (:mod:`sdbridge.registry`) and stored here under ``schema/<group>/<name>``; the dataclass holds the
defaults and the YAML only what differs from them (a variant extends its parent; ``python run.py --cfg job`` prints
every composed value). A misspelt key fails at start
("Key 'scal' not in 'SDSConfig'"), an unknown option lists the available ones, an enum lists its allowed values, and
range checks run in each dataclass's ``__post_init__`` when the composed config is turned into objects
(:func:`to_objects`), before anything is built or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import sdbridge.guidance  # noqa: F401  (each module registers its options: sdbridge.registry)
import sdbridge.priors  # noqa: F401
import sdbridge.schedules  # noqa: F401
import sdbridge.targets  # noqa: F401
from sdbridge import registry
from sdbridge.prompts import PromptConfig


class LoggerKind(Enum):
    csv = "Lightning CSVLogger (metrics.csv)"
    wandb = "Weights & Biases (offline unless WANDB_MODE=online)"
    none = "no metric logger"


@registry.option("logger", "logger")
@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.csv
    project: str = "sdbridge"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user)
    group: Optional[str] = None  # W&B group; default: the guidance name, so a sweep groups by method
    name: Optional[str] = None  # run name; default: "<guidance>-<prior>-<run dir name>"
    tags: list[str] = field(default_factory=list)


@registry.option("trainer", "trainer")
@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accelerator: str = "auto"  # "auto" follows the prior's device; "cpu", "gpu" / "cuda", "mps" must match it
    precision: str = "32-true"
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end)
    save_every: int = 100  # steps between image grids (0: only at the end)
    video_every: int = 0  # steps between video frames (0: no video)
    log_every: int = 10
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps={self.max_steps} must be >= 1")
        for key in ("checkpoint_every", "save_every", "video_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)} must be >= 0")
        if self.log_every < 1:
            raise ValueError(f"trainer.log_every={self.log_every} must be >= 1")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"trainer.accelerator={self.accelerator!r} is not one of {list(ACCELERATORS)} "
                             "('auto' follows prior.device)")


#: ``trainer.accelerator`` -> the ``prior.device`` type it runs on (``auto``: whatever the prior's device is)
ACCELERATORS = {"auto": None, "cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}


@registry.option("eval", "eval")
@dataclass
class EvalConfig:
    exact: bool = True  # exact metrics (FD, NLL, collapse, sharpness) when the prior is analytic
    every: int = 0  # also log them every k steps (0: only at the end)

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every={self.every} must be >= 0")


@dataclass
class RunConfig:
    """The root config (``conf/config.yaml``)."""

    prior: Any = MISSING
    guidance: Any = MISSING
    scheduler: Any = MISSING
    prompt: PromptConfig = MISSING
    target: Any = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = MISSING
    seed: int = 0
    resume: Optional[str] = None  # a run directory to continue from its last checkpoint


#: group -> {option name: schema}: the one registry (each option registers where its class is defined)
SCHEMAS: dict[str, dict[str, type]] = registry.groups()


def register_configs() -> None:
    """The schemas in Hydra's ConfigStore and the resolver ``conf/config.yaml`` uses for ``hydra.run.dir``."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    if not OmegaConf.has_resolver("sdb_run_dir"):
        # hydra.run.dir: the resumed run's own directory, else a fresh timestamped one.
        OmegaConf.register_new_resolver("sdb_run_dir", lambda resume, fresh: resume if resume else fresh)


def to_objects(cfg: DictConfig) -> RunConfig:
    """Composed config -> dataclass instances, running every ``__post_init__`` range check."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig)
    return obj


register_configs()
