"""Build and train one run from a typed config and return its summary: the library call under every entry point
(``python run.py`` through :mod:`sdbridge.cli`, the exact-table and benchmark harnesses, the tests).

A run directory holds::

    summary.json         steps, time, NFEs, loss, metrics, output paths (written here, once)
    images/step_*.png    grids every trainer.save_every steps
    images/final/        one PNG per image and grid.png
    video.mp4            with trainer.video_every > 0
    checkpoints/last.ckpt
    logs/metrics.csv     (logger=csv) or wandb/ (logger=wandb)

``config.yaml`` and ``overrides.yaml`` (for resume) are written by the CLI, and in a sweep a failed job's
``FAILED`` (its one-line reason). Every file is written atomically (:mod:`sdbridge.files`); a write that fails stops
the run with :class:`SaveFailed`, the last checkpoint kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sdbridge.callbacks.summary import write_summary
from sdbridge.config import LoggerKind, RunConfig
from sdbridge.files import WriteFailed, atomic_open, remove_temporaries
from sdbridge.targets import ImageTargetConfig

log = logging.getLogger("sdbridge")


def quiet_libraries() -> None:
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


def build_logger(config: RunConfig, run_dir: Path, resolved: dict[str, Any], run_name: str):
    """The metric logger of ``logger.kind``. W&B runs offline (files under ``<run>/wandb``) unless WANDB_MODE=online.

    W&B naming makes a multirun sweep readable: group = the method (each method's shards together), job type = the
    prior, name = ``<method>-<prior>[-shard<i>of<n>]-<job>``, tags = method, prior, target, prompt set and the sweep.
    """
    kind = config.logger.kind
    if kind == LoggerKind.none:
        return False
    if kind == LoggerKind.csv:
        from sdbridge.callbacks.csv_log import RunCSVLogger

        return RunCSVLogger(save_dir=str(run_dir), name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    offline = os.environ.get("WANDB_MODE", "offline") != "online"
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    choices = resolved.get("_choices", {})
    guidance = choices.get("guidance", "run")
    tags = [guidance, choices.get("prior", "prior"), choices.get("target", "target"),
            f"prompt:{choices.get('prompt', 'prompt')}"]
    if resolved.get("_sweep"):
        tags.append(f"sweep:{resolved['_sweep']}")
    return WandbLogger(
        project=config.logger.project,
        entity=config.logger.entity,
        group=config.logger.group or guidance,
        job_type=choices.get("prior"),
        name=config.logger.name or run_name,
        tags=[*tags, *config.logger.tags],
        save_dir=str(run_dir),
        offline=offline,
        config={k: v for k, v in resolved.items() if not k.startswith("_")} | {"choices": choices},
        id=hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],  # stable: a resume reattaches
        resume="allow",
    )


def run(
    config: RunConfig,
    run_dir: Path,
    resolved: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    prior: Any = None,
) -> dict[str, Any]:
    """Build everything from ``config`` and train; returns the summary (also written to ``summary.json``).

    ``prior``: an already built prior for ``config.prior`` (benchmarks reuse one across runs).

    With ``prompt.batch_size`` smaller than the run's sample count, the samples are optimized one batch at a time,
    each batch a complete optimization in ``batches/NNNN/`` (its own images, checkpoints and summary); finished
    batches are skipped and a started one continues from its checkpoint when the run is resumed or requeued. The
    run's ``summary.json`` then merges the batches.

    A file that cannot be written (a full disk) stops the run with :class:`SaveFailed`, the previous checkpoint kept.
    """
    run_dir = Path(run_dir)
    try:
        return _run(config, run_dir, resolved or {}, callbacks, prior)
    except WriteFailed as err:
        raise SaveFailed(err, run_dir) from err


def _run(config: RunConfig, run_dir: Path, resolved: dict[str, Any], callbacks: Sequence[Any],
         prior: Any) -> dict[str, Any]:
    import time

    from sdbridge.priors import build_prior
    from sdbridge.prompts import load_prompt_set

    quiet_libraries()
    setup_start = time.perf_counter()
    prompt_set = load_prompt_set(config.prompt)
    _check_batching(config, prompt_set)
    prior = prior if prior is not None else build_prior(config.prior)
    setup_s = time.perf_counter() - setup_start
    batches = prompt_set.batches(config.prompt.batch_size)
    logger = build_logger(config, run_dir, resolved, _run_name(config, resolved, run_dir))
    if len(batches) == 1:
        summary = _optimize(config, prior, prompt_set, run_dir, resolved, callbacks, logger)
    else:
        parts = []
        for k, batch in enumerate(batches):
            batch_dir = run_dir / "batches" / f"{k:04d}"
            done = finished_summary(batch_dir, config.trainer.max_steps)  # None: unfinished or a damaged summary
            if done is not None:
                parts.append(done)
                continue
            try:
                json.loads((batch_dir / "summary.json").read_text())
            except ValueError:
                log.warning("sdbridge: %s cannot be read: batch %d is finished again from its checkpoint",
                            batch_dir / "summary.json", k + 1)
            except OSError:
                pass  # not written yet
            log.info("sdbridge: batch %d/%d (%d samples)", k + 1, len(batches), len(batch))
            batch_logger = logger if config.logger.kind == LoggerKind.wandb else build_logger(
                config, batch_dir, resolved, f"{_run_name(config, resolved, run_dir)}-b{k:04d}")
            part = _optimize(config, prior, batch, batch_dir, resolved, callbacks, batch_logger, batch=k)
            write_summary(batch_dir, part)
            parts.append(part)
        summary = merge_summaries(parts, run_dir)
        if prior.has_true_distribution and config.eval.exact:
            from sdbridge.metrics.exact import exact_metrics

            samples = torch.cat([torch.load(Path(p["model_samples"]), weights_only=True) for p in parts])
            summary["exact_metrics"] = exact_metrics(prior, samples, [r["prompt"] for r in summary["samples"]])
    summary["setup_s"] = round(setup_s, 3)
    summary["batch_size"] = config.prompt.batch_size
    write_summary(run_dir, summary)  # the one writer of a run's summary.json
    if logger:
        if summary.get("batches"):  # a single optimization's summary was logged by its SummaryCallback already
            from sdbridge.callbacks.summary import summary_metrics

            logger.log_metrics(summary_metrics(summary), step=summary["steps"])
        logger.finalize("success")
        _finish_wandb(logger)
    return summary


def check_run(config: RunConfig) -> None:
    """Everything about ``config`` that can be refused without building anything, as ``ValueError`` /
    ``FileNotFoundError`` naming the option: the devices (``prior.device``, ``trainer.accelerator``), the prompt set
    (``prompt.file`` readable as UTF-8, the COCO files), a local ``prior.model`` folder's weights (not empty, not
    truncated) and an init the prior cannot give (``target.init=samples``). The CLI calls it before it writes
    anything, so such a mistake leaves no run directory behind."""
    from sdbridge.priors import check_prior_files
    from sdbridge.prompts import load_prompt_set
    from sdbridge.targets.image import check_init

    check_devices(config)
    _check_batching(config, load_prompt_set(config.prompt), warn=False)
    check_prior_files(config.prior)
    check_init(config.target, getattr(type(config.prior), "builds", object))


def check_devices(config: RunConfig) -> None:
    """``prior.device`` exists here and ``trainer.accelerator`` runs on it (``auto`` always does)."""
    from sdbridge.config import ACCELERATORS
    from sdbridge.priors.base import available_devices, resolve_device

    device = resolve_device(config.prior.device)
    accelerator = config.trainer.accelerator
    wanted = ACCELERATORS.get(accelerator)
    if wanted is not None and wanted not in available_devices():
        raise ValueError(f"trainer.accelerator={accelerator!r} but {'CUDA' if wanted == 'cuda' else wanted.upper()} is "
                         "not available here; use trainer.accelerator=auto (it follows prior.device) or cpu")
    if wanted is not None and wanted != device.type:
        raise ValueError(f"trainer.accelerator={accelerator!r} does not run on prior.device={config.prior.device!r} "
                         f"({device.type}): the target and the prior share one device; use trainer.accelerator=auto")


def _check_batching(config: RunConfig, prompt_set: Any, warn: bool = True) -> None:
    from sdbridge.targets import NeRFTargetConfig

    if isinstance(config.target, NeRFTargetConfig):
        if config.prompt.seed_per_prompt or (config.prompt.batch_size or len(prompt_set)) < len(prompt_set):
            raise ValueError("prompt.batch_size and prompt.seed_per_prompt apply to image targets: a NeRF is one "
                             "scene rendered for all of its prompts")
        return
    if warn and config.prompt.seed_per_prompt and getattr(config.guidance, "lora_rank", None) is not None:
        log.warning("sdbridge: %s trains one source network on the whole batch, so with prompt.seed_per_prompt a "
                    "sample's result still depends on its batch", type(config.guidance).__name__)


def _run_name(config: RunConfig, resolved: dict[str, Any], run_dir: Path) -> str:
    """``<method>-<prior>[-shard<i>of<n>]-<job>``: the job number in a sweep, the time of a single run."""
    choices = resolved.get("_choices", {})
    shard = f"-shard{config.prompt.shard}of{config.prompt.num_shards}" if config.prompt.num_shards > 1 else ""
    job = run_dir.name.split("_", 1)[0] if resolved.get("_sweep") else run_dir.name
    return f"{choices.get('guidance', 'run')}-{choices.get('prior', 'prior')}{shard}-{job}"


def _finish_wandb(logger: Any) -> None:
    """Close the W&B run so a second run in the same process (tests, sweeps with the basic launcher) starts anew."""
    if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish()


def merge_summaries(parts: Sequence[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """One summary for a run optimized in batches: totals and per-image / per-step averages over the batches."""
    from sdbridge.callbacks.summary import cost_totals

    first = parts[0]
    totals = {k: round(v, 3) if isinstance(v, float) else v for k, v in cost_totals(parts).items()}
    merged = {k: first[k] for k in ("guidance", "prior", "target", "seed", "prompt_set", "protocol") if k in first}
    merged.update(
        totals,
        run_dir=str(run_dir),
        steps=first["max_steps"],
        max_steps=first["max_steps"],
        batches=len(parts),
        peak_memory_kind=first["peak_memory_kind"],
        final_loss=sum(p["final_loss"] * p["num_images"] for p in parts) / totals["num_images"],
        prompts=[q for p in parts for q in p["prompts"]],
        samples=[s for p in parts for s in p["samples"]],
        batch_dirs=[p["run_dir"] for p in parts],
    )
    return merged


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, read without running code (``weights_only=True``: tensors and plain values only).
    Every checkpoint is read this way before Lightning (which unpickles it fully) is handed it, so a file holding
    anything else is refused, never executed; a truncated or damaged file is named."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise ValueError(f"{path} holds objects other than tensors and plain values; refusing to load it (unpickling "
                         f"it could run code): {reason}") from None
    except (EOFError, RuntimeError, OSError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:120]}): the checkpoint is damaged "
                         "or truncated; start a new run (or restore the file)") from None
    if not isinstance(state, dict) or "global_step" not in state or "sdbridge" not in state:
        raise ValueError(f"{path} is not an sdbridge checkpoint (no global_step / sdbridge state)")
    return state


class SaveFailed(Exception):
    """A file of the run could not be written (a full disk, a read-only file): the run stopped there, every file as
    it was before the failed write (:mod:`sdbridge.files`), the last checkpoint kept."""

    def __init__(self, err: WriteFailed, run_dir: Path):
        what = "checkpoint " if err.path.suffix == ".ckpt" else ""
        mine = [c for c in checkpoints_of(run_dir) if c.parent.parent in err.path.parents] or checkpoints_of(run_dir)
        if mine:
            step = int(read_checkpoint(mine[-1])["global_step"])
            then = f"the previous checkpoint at step {step} is kept; resume with resume={run_dir}"
        else:
            then = "no checkpoint was written before it; start the run again"
        super().__init__(f"could not write {what}{err.path}: {err.reason}; {then}")
        self.path = err.path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer (ModelCheckpoint, ``trainer.save_checkpoint``) through :mod:`sdbridge.files`: the
    checkpoint is written beside its target and renamed over it, never copied over it from $TMPDIR, so a failed save
    keeps the previous checkpoint whole and leaves no temporary file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run at the end of a step; the checkpoint holds that step."""

    def __init__(self, step: int, run_dir: Path, checkpoint: Path | None):
        where = (f"resume with resume={run_dir}" if checkpoint is not None
                 else "no checkpoint was written (trainer.checkpoint_every=0)")
        super().__init__(f"interrupted at step {step}; {where}")
        self.step = step


def _checkpoint_on_interrupt(path: Path) -> Any:
    """A Lightning callback: on SIGTERM (Lightning stops after the current step) it saves ``path`` at that step."""
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class CheckpointOnInterrupt(Callback):
        saved = False

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
                trainer.save_checkpoint(str(path))
                self.saved = True

    return CheckpointOnInterrupt()


@contextlib.contextmanager
def _sigint_finishes_the_step(trainer: Any):
    """Ctrl+C (SIGINT) stops the run like SIGTERM, after the step in progress, so its checkpoint is a whole step (a
    second Ctrl+C interrupts at once)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        trainer._signal_connector.received_sigterm = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class RunDirectoryInUse(ValueError):
    """Another live process holds the run directory's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``run_dir/run.lock`` (the holder's pid and host) while writing into ``run_dir``: a second run, resume or
    requeued job into the same directory is refused instead of mixing its files with the first's. A lock left by a
    process that is gone (same host) is taken over; the lock is removed when the block ends."""
    import socket

    path = run_dir / "run.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise RunDirectoryInUse(
                f"{run_dir} is in use by another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}): "
                f"wait for it to end or choose another hydra.run.dir (delete {path} if that process is gone)") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        remove_temporaries(run_dir)  # a killed predecessor's unfinished writes (the lock says none is in progress)
        yield
    finally:
        path.unlink(missing_ok=True)


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The checkpoints a resume of ``run_dir`` would load (its own, or its batches')."""
    return [p for p in [run_dir / "checkpoints" / "last.ckpt", *sorted((run_dir / "batches").glob(
        "*/checkpoints/last.ckpt"))] if p.is_file()]


def finished_summary(run_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """The summary of the run in ``run_dir`` if it already reached ``max_steps`` (a re-launch is then a no-op)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or int(summary.get("steps") or 0) < max_steps:
        return None
    if summary.get("batches"):  # a run in batches is finished when every batch is (a requeued job may lack one)
        done = [finished_summary(d, max_steps) for d in sorted((run_dir / "batches").glob("*")) if d.is_dir()]
        if len(done) < int(summary["batches"]) or any(d is None for d in done):
            return None
    return summary


def _optimize(
    config: RunConfig,
    prior: Any,
    prompt_set: Any,
    run_dir: Path,
    resolved: dict[str, Any],
    callbacks: Sequence[Any],
    logger: Any,
    batch: int | None = None,
) -> dict[str, Any]:
    """One optimization of ``prompt_set``'s samples in ``run_dir`` (continued from its checkpoint if it has one)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sdbridge.callbacks import MediaCallback, SummaryCallback
    from sdbridge.callbacks.exact_metrics import ExactMetricsCallback
    from sdbridge.callbacks.progress import StepProgressBar
    from sdbridge.guidance import build_guidance
    from sdbridge.rng import SampleGenerators
    from sdbridge.schedules import build_schedule
    from sdbridge.system import DistillationSystem
    from sdbridge.registry import build

    run_dir.mkdir(parents=True, exist_ok=True)
    choices = resolved.get("_choices", {})
    prompts = list(prompt_set.texts)
    if config.prompt.seed_per_prompt:
        generator: Any = SampleGenerators(config.seed, prompt_set.keys)
    else:
        generator = torch.Generator().manual_seed(config.seed)
    schedule = build_schedule(config.scheduler, prior.num_train_timesteps)
    guidance = build_guidance(config.guidance, prior, schedule, generator,
                              config.target.view_prompting()).to(prior.device)
    target = build(config.target, prior, len(prompts), generator, prompts)
    guidance.prepare(target.guidance_prompts(prompts))
    system = DistillationSystem(prior, guidance, target, prompts, generator)

    ckpt_dir = run_dir / "checkpoints"
    last_ckpt = ckpt_dir / "last.ckpt"
    resume_from = last_ckpt if last_ckpt.is_file() and (config.resume or batch is not None) else None
    info = {
        "run_dir": str(run_dir),
        "guidance": choices.get("guidance", type(guidance).__name__),
        "prior": choices.get("prior", type(prior).__name__),
        "target": choices.get("target", type(target).__name__),
        "seed": config.seed,
        "prompt_set": prompt_set.description,
        "protocol": protocol_of(config, prior, prompt_set, choices),
        "batch": batch,
        "prompts": prompts,
        "resumed_from_step": None,
    }
    media = MediaCallback(run_dir, config.trainer.save_every, config.trainer.video_every)
    summary_cb = SummaryCallback(run_dir, info, prior.device)
    on_interrupt = _checkpoint_on_interrupt(last_ckpt) if config.trainer.checkpoint_every > 0 else None
    all_callbacks: list[Any] = [media, summary_cb, *callbacks, *([on_interrupt] if on_interrupt else [])]
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
    if config.eval.exact and prior.has_true_distribution:
        exact_cb = ExactMetricsCallback(prior, config.eval.every)
        all_callbacks.append(exact_cb)
    if config.trainer.progress_bar:
        all_callbacks.append(StepProgressBar(leave=True))
    accelerator = config.trainer.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if prior.device.type == "cuda" else "cpu"
    elif accelerator == "cuda":  # as "gpu": on the prior's own CUDA device (check_devices made sure it is one)
        accelerator = "gpu"
    trainer = L.Trainer(
        max_steps=config.trainer.max_steps,
        max_epochs=-1,
        accelerator=accelerator,
        devices=[prior.device.index or 0] if accelerator == "gpu" else 1,
        precision=config.trainer.precision,
        logger=logger,
        callbacks=all_callbacks,
        enable_progress_bar=config.trainer.progress_bar,
        enable_model_summary=False,
        enable_checkpointing=config.trainer.checkpoint_every > 0,
        log_every_n_steps=config.trainer.log_every,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO(), *_cluster_plugins()],
    )
    if resume_from is not None:
        info["resumed_from_step"] = int(read_checkpoint(resume_from)["global_step"])
        summary_cb.info["resumed_from_step"] = info["resumed_from_step"]
    try:
        with _sigint_finishes_the_step(trainer):
            trainer.fit(system, datamodule=target.datamodule(), ckpt_path=str(resume_from) if resume_from else None)
    except RuntimeError as err:
        if resume_from is None or "loading state_dict" not in str(err):
            raise
        raise ValueError(f"the checkpoint {resume_from} does not fit this run's config (made with other settings or "
                         f"another sdbridge version): {str(err).splitlines()[-1].strip()}") from err
    except BaseException as err:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(err, SIGTERMException):
            raise RunInterrupted(trainer.global_step, run_dir,
                                 last_ckpt if on_interrupt is not None and on_interrupt.saved else None) from None
        raise
    if (info["resumed_from_step"] or 0) >= config.trainer.max_steps:
        # checkpointed at its last step, then stopped in the export (a failed write, a kill): Lightning skips the
        # finished loop and its end hooks, so the export is done here
        for cb in (media, exact_cb):
            if cb is not None:
                cb.on_train_end(trainer, system)
    if trainer.global_step > 0 and not trainer.interrupted:
        trainer.save_checkpoint(str(last_ckpt))
    samples = [dict(r) for r in prompt_set.records]
    if len(media.final_paths) >= len(samples) and isinstance(config.target, ImageTargetConfig):
        for record, path in zip(samples, media.final_paths):
            record["file"] = str(path)
    extra: dict[str, Any] = {
        "samples": samples,
        "images": [str(p) for p in media.final_paths],
        "grid": str(run_dir / "images" / "final" / "grid.png"),
        "video": str(media.video_path) if media.video_path else None,
        "checkpoint": str(last_ckpt) if last_ckpt.exists() else None,
    }
    if prior.has_true_distribution:  # model-space samples, so exact metrics can be merged across batches
        extra["model_samples"] = str(run_dir / "model_samples.pt")
        with atomic_open(run_dir / "model_samples.pt") as f:
            torch.save(target.model_samples().cpu(), f)
        if isinstance(config.target, ImageTargetConfig):
            scored = exact_cb is not None  # eval.exact=false: no metrics, so no reference row either
            compare, reference = _compare_with_exact_samples(prior, target, samples, run_dir, config.seed, scored)
            extra["compare"] = str(compare)
            if reference is not None:
                extra["exact_metrics_reference"] = reference
    if exact_cb is not None and exact_cb.final is not None:
        extra["exact_metrics"] = exact_cb.final
    return summary_cb.finish(trainer, system, extra)


def _compare_with_exact_samples(prior: Any, target: Any, samples: list[dict], run_dir: Path, seed: int,
                                scored: bool = True) -> tuple[Path, dict | None]:
    """``images/final/compare.png``: per prompt, a row of the run's images and below it a row of exact samples of the
    same prompt (as many, drawn with the run's seed), each image upsampled to >= 128 px; and (``scored``) the exact
    metrics of those exact samples (the reference row of the printed table: what the truth itself scores at this
    count, e.g. the finite-sample FD), else None."""
    from sdbridge.media import comparison_grid, save_png
    from sdbridge.metrics.exact import exact_metrics

    images = target.preview()
    rows, true, prompts = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for prompt in dict.fromkeys(r["prompt"] for r in samples):
        index = [i for i, r in enumerate(samples) if r["prompt"] == prompt]
        drawn = prior.sample(prompt, len(index), gen).to(prior.device)
        rows += [images[index], prior.decode(drawn).cpu()]
        true.append(drawn)
        prompts += [prompt] * len(index)
    path = save_png(comparison_grid(rows), run_dir / "images" / "final" / "compare.png")
    return path, exact_metrics(prior, torch.cat(true), prompts) if scored else None


def protocol_of(config: RunConfig, prior: Any, prompt_set: Any, choices: dict[str, Any]) -> dict[str, Any]:
    """What must match for two runs to be compared in one table (the method aside)."""
    prompts = {k: v for k, v in prompt_set.description.items() if k not in ("shard", "num_shards")}
    return {
        "prior": choices.get("prior", type(prior).__name__),
        "target": choices.get("target", type(config.target).__name__),
        "sample_shape": list(prior.sample_shape),
        **config.target.protocol_fields(),
        "steps": config.trainer.max_steps,
        "seed": config.seed,
        "prompts": prompts,
    }


def _cluster_plugins() -> list[Any]:
    """Under SLURM, leave requeueing to submitit (hydra/launcher=slurm): Lightning's own SIGUSR1 auto-requeue off."""
    if "SLURM_JOB_ID" not in os.environ:
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


# ---------------------------------------------------------------------------------------------------------- main
