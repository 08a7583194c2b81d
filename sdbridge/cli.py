"""``python run.py ...``: compose the config, build prior / guidance / target, train, write the results.

A run directory holds::

    config.yaml          the resolved config          overrides.yaml   the command-line overrides (for resume)
    summary.json         steps, time, NFEs, loss, metrics, output paths
    images/step_*.png    grids every trainer.save_every steps
    images/final/        one PNG per image and grid.png
    video.mp4            with trainer.video_every > 0
    checkpoints/last.ckpt
    logs/metrics.csv     (logger=csv) or wandb/ (logger=wandb)

Bad input fails before anything is written: the run directory Hydra made is removed again if the run never started.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from sdbridge.config import SCHEMAS, LoggerKind, RunConfig, to_objects

log = logging.getLogger("sdbridge")

#: Errors that mean "the user asked for something impossible": printed as one message, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("sdb_run_dir"):
        # hydra.run.dir: the resumed run's own directory, else a fresh timestamped one.
        OmegaConf.register_new_resolver("sdb_run_dir", lambda resume, fresh: resume if resume else fresh)


_register_resolvers()


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "diffusers", "lightning.pytorch.utilities.rank_zero", "lightning.fabric",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*not restartable.*")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging tweaks are best effort
        pass


# ---------------------------------------------------------------------------------------------------------- resume
def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_overrides(run_dir: Path, new_overrides: Sequence[str]) -> list[str]:
    """The overrides that recreate the run in ``run_dir``, updated by ``new_overrides`` (e.g. a longer max_steps).

    Changing a config group (``guidance=...``) or the seed would make the checkpoint meaningless and is refused.
    """
    saved_file = run_dir / "overrides.yaml"
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise FileNotFoundError(f"resume={str(run_dir)!r}: no checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'}")
    saved = list(OmegaConf.load(saved_file)) if saved_file.is_file() else []
    merged = {_override_key(o): o for o in saved}
    for o in new_overrides:
        key = _override_key(o)
        if key == "resume":
            continue
        if key in SCHEMAS or key == "seed":
            raise ValueError(f"cannot change {key!r} when resuming {run_dir}: start a new run instead")
        merged[key] = o
    return list(merged.values())


def compose_for_resume(cfg: DictConfig, task_overrides: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """Recompose the resumed run's config from its saved overrides plus the new ones."""
    from hydra import compose

    run_dir = Path(cfg.resume).expanduser()
    overrides = resume_overrides(run_dir, task_overrides)
    return compose(config_name="config", overrides=[*overrides, f"resume={run_dir}"]), overrides


# ---------------------------------------------------------------------------------------------------------- build
def build_logger(config: RunConfig, run_dir: Path, resolved: dict[str, Any], run_name: str):
    kind = config.logger.kind
    if kind == LoggerKind.none:
        return False
    if kind == LoggerKind.csv:
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE", "offline") != "online"
    return WandbLogger(
        project=config.logger.project,
        entity=config.logger.entity,
        group=config.logger.group or resolved.get("_choices", {}).get("guidance"),
        name=config.logger.name or run_name,
        tags=list(config.logger.tags),
        save_dir=str(run_dir),
        offline=offline,
        config=resolved,
        id=hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],  # stable: a resume reattaches
        resume="allow",
    )


def run(
    config: RunConfig,
    run_dir: Path,
    resolved: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Build everything from ``config`` and train; returns the summary (also written to ``summary.json``)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sdbridge.callbacks import MediaCallback, SummaryCallback
    from sdbridge.callbacks.exact_metrics import ExactMetricsCallback
    from sdbridge.callbacks.progress import StepProgressBar
    from sdbridge.priors.analytic import AnalyticPrior
    from sdbridge.guidance import build_guidance
    from sdbridge.priors import build_prior
    from sdbridge.prompts import load_prompts
    from sdbridge.schedules import build_schedule
    from sdbridge.system import DistillationSystem
    from sdbridge.targets import TARGETS

    _quiet_libraries()
    run_dir = Path(run_dir)
    resolved = resolved or {}
    choices = resolved.get("_choices", {})
    prompts = load_prompts(config.prompt)
    generator = torch.Generator().manual_seed(config.seed)
    prior = build_prior(config.prior)
    schedule = build_schedule(config.scheduler, prior.num_train_timesteps)
    guidance = build_guidance(config.guidance, prior, schedule, generator).to(prior.device)
    target = TARGETS[type(config.target)](config.target, prior, len(prompts), generator, prompts)
    guidance.prepare(target.guidance_prompts(prompts))
    system = DistillationSystem(prior, guidance, target, prompts, generator)

    ckpt_dir = run_dir / "checkpoints"
    last_ckpt = ckpt_dir / "last.ckpt"
    resume_from = last_ckpt if config.resume else None
    run_name = f"{choices.get('guidance', type(guidance).__name__.lower())}-{choices.get('prior', 'prior')}-{run_dir.name}"
    info = {
        "run_dir": str(run_dir),
        "guidance": choices.get("guidance", type(guidance).__name__),
        "prior": choices.get("prior", type(prior).__name__),
        "target": choices.get("target", type(target).__name__),
        "seed": config.seed,
        "prompts": prompts,
        "resumed_from_step": None,
    }
    media = MediaCallback(run_dir, config.trainer.save_every, config.trainer.video_every)
    summary_cb = SummaryCallback(run_dir, info)
    all_callbacks: list[Any] = [media, summary_cb, *callbacks]
    if config.trainer.checkpoint_every > 0:
        all_callbacks.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                filename="step{step:06d}",
                every_n_train_steps=config.trainer.checkpoint_every,
                save_top_k=0,
                save_last=True,
                save_on_train_epoch_end=False,
            )
        )
    exact_cb = None
    if config.eval.exact and isinstance(prior, AnalyticPrior):
        exact_cb = ExactMetricsCallback(prior, config.eval.every)
        all_callbacks.append(exact_cb)
    if config.trainer.progress_bar:
        all_callbacks.append(StepProgressBar(leave=True))
    accelerator = config.trainer.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if prior.device.type == "cuda" else "cpu"
    trainer = L.Trainer(
        max_steps=config.trainer.max_steps,
        max_epochs=-1,
        accelerator=accelerator,
        devices=[prior.device.index or 0] if accelerator == "gpu" else 1,
        precision=config.trainer.precision,
        logger=build_logger(config, run_dir, resolved, run_name),
        callbacks=all_callbacks,
        enable_progress_bar=config.trainer.progress_bar,
        enable_model_summary=False,
        enable_checkpointing=config.trainer.checkpoint_every > 0,
        log_every_n_steps=config.trainer.log_every,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(run_dir),
    )
    if resume_from is not None:
        info["resumed_from_step"] = int(torch.load(resume_from, map_location="cpu", weights_only=False)["global_step"])
        summary_cb.info["resumed_from_step"] = info["resumed_from_step"]
    trainer.fit(system, datamodule=target.datamodule(), ckpt_path=str(resume_from) if resume_from else None)
    if trainer.global_step > 0 and not trainer.interrupted:
        trainer.save_checkpoint(str(last_ckpt))
    extra = {
        "images": [str(p) for p in media.final_paths],
        "grid": str(run_dir / "images" / "final" / "grid.png"),
        "video": str(media.video_path) if media.video_path else None,
        "checkpoint": str(last_ckpt) if last_ckpt.exists() else None,
    }
    if exact_cb is not None and exact_cb.final is not None:
        extra["exact_metrics"] = exact_cb.final
    summary = summary_cb.write(trainer, system, extra)
    if trainer.logger:
        trainer.logger.log_metrics({"summary/final_loss": summary["final_loss"]}, step=trainer.global_step)
        trainer.logger.finalize("success")
    return summary


# ---------------------------------------------------------------------------------------------------------- main
def _only_hydra_files(run_dir: Path) -> bool:
    return all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra task function (``run.py``)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = not cfg.resume
    overrides = list(hc.overrides.task)
    try:
        if cfg.resume:
            cfg, overrides = compose_for_resume(cfg, overrides)
        config = to_objects(cfg)
    except USER_ERRORS as err:
        return _fail(err, run_dir if fresh else None)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["_choices"] = {k: v for k, v in hc.runtime.choices.items() if not k.startswith(("hydra", "schema"))}
    OmegaConf.save(OmegaConf.create({k: v for k, v in resolved.items() if k != "_choices"}), run_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / "overrides.yaml")
    try:
        summary = run(config, run_dir, resolved)
    except USER_ERRORS as err:
        if fresh and not (run_dir / "checkpoints").exists():
            for name in ("config.yaml", "overrides.yaml"):
                (run_dir / name).unlink(missing_ok=True)
        return _fail(err, run_dir if fresh else None)
    except Exception as err:
        from sdbridge.priors.stable_diffusion import PriorUnavailableError

        if isinstance(err, PriorUnavailableError):
            for name in ("config.yaml", "overrides.yaml"):
                (run_dir / name).unlink(missing_ok=True)
            return _fail(err, run_dir if fresh else None)
        raise
    if "exact_metrics" in summary:
        from sdbridge.callbacks.exact_metrics import format_metrics

        print("\nExact metrics against the true distributions (sdbridge/eval/exact.py):")
        print(format_metrics(summary["exact_metrics"]))
    print(f"\nsdbridge: {summary['steps']} steps in {summary['wall_clock_s']:.1f} s, "
          f"{summary['nfe_per_step']} NFEs/step, final loss {summary['final_loss']:.4g}")
    print(f"sdbridge: images in {run_dir / 'images' / 'final'}, summary in {run_dir / 'summary.json'}")
    return summary


def _fail(err: BaseException, cleanup_dir: Path | None) -> None:
    if cleanup_dir is not None and cleanup_dir.is_dir() and _only_hydra_files(cleanup_dir):
        shutil.rmtree(cleanup_dir, ignore_errors=True)
    print(f"sdbridge: error: {err}", file=sys.stderr)
    sys.exit(2)
