"""``python run.py ...``: the Hydra glue around :func:`sdbridge.runner.run`: resume policy (continue a run in place,
recompose a resumed run's config), the run directory's ``config.yaml`` / ``overrides.yaml``, one-line errors, and
sweeps that go on past a failed job (its ``FAILED`` file; :class:`SweepReport` lists them at the end).

Bad input fails before anything is written: the run directory Hydra made is removed again if the run never started.
The other files of a run directory are described in :mod:`sdbridge.runner`.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sdbridge.config import SCHEMAS, to_objects
from sdbridge.files import WriteFailed, write_text
from sdbridge.guidance.base import NonFiniteGradientError
from sdbridge.runner import (
    RunDirectoryInUse,
    RunInterrupted,
    SaveFailed,
    check_run,
    checkpoints_of,
    finished_summary,
    read_checkpoint,
    run,
    run_lock,
)

log = logging.getLogger("sdbridge")

#: Errors that mean "the user asked for something impossible": printed as one message, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)

#: exit status of a run stopped by SIGTERM or Ctrl+C (128 + SIGTERM, as a shell reports a process it terminated)
INTERRUPTED_EXIT = 143

#: what a resume may change: how long the run goes on and how it logs, where the prior runs; never what is optimized
#: (prompts, prior, guidance, target, schedule, seed), which the checkpoint was made for
RESUMABLE_KEYS = ("trainer.", "logger.", "eval.", "hydra.", "prior.device", "prior.cache_dir")

#: in a sweep, a failed job's directory holds this file: the one-line reason (and the traceback of an unexpected error)
FAILED = "FAILED"


class CommandFailed(SystemExit):
    """A one-line error, already printed: exit status 2 (in a sweep, the job's ``FAILED`` file)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------------------------- resume
def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_overrides(run_dir: Path, new_overrides: Sequence[str]) -> list[str]:
    """The overrides that recreate the run in ``run_dir``, updated by ``new_overrides`` (e.g. a longer max_steps).

    Changing a config group (``guidance=...``), the seed or any value of what is optimized (``prompt.texts``,
    ``prior.size``, ...) would make the checkpoint meaningless and is refused before any file is written; only
    :data:`RESUMABLE_KEYS` may change.
    """
    saved_file = run_dir / "overrides.yaml"
    if not has_checkpoint(run_dir):
        raise FileNotFoundError(f"resume={str(run_dir)!r}: no checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'} "
                                f"(nor under {run_dir / 'batches'})")
    saved = list(OmegaConf.load(saved_file)) if saved_file.is_file() else []
    merged = {_override_key(o): o for o in saved}
    for o in new_overrides:
        key = _override_key(o)
        if key == "resume":
            continue
        if merged.get(key) == o:  # the run's own override, repeated (the whole command line plus resume=)
            continue
        if key in SCHEMAS or key == "seed":
            raise ValueError(f"cannot change {key!r} when resuming {run_dir}: start a new run instead")
        if merged.get(key) != o and not _resumable(key):
            raise ValueError(f"cannot change {key!r} when resuming {run_dir}: the checkpoint was made for its saved "
                             f"value (a resume may change {', '.join(k.rstrip('.') for k in RESUMABLE_KEYS)}); start a "
                             "new run instead")
        merged[key] = o
    return list(merged.values())


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that can be continued (its checkpoint, or those of its batches)."""
    return (run_dir / "checkpoints" / "last.ckpt").is_file() or any((run_dir / "batches").glob("*/checkpoints/last.ckpt"))


def continues_in_place(run_dir: Path, overrides: Sequence[str], cfg: DictConfig | None = None) -> bool:
    """A fresh launch into a directory that already holds this very run (a requeued or re-launched SLURM job).

    True when ``run_dir`` has a checkpoint and was started with the same overrides and, if ``cfg`` is given, the
    same resolved config: the run then continues instead of starting over. The same directory with other overrides
    or another config (e.g. changed defaults) is refused rather than overwritten.
    """
    saved = run_dir / "overrides.yaml"
    if not (saved.is_file() and has_checkpoint(run_dir)):
        return False
    before = [o for o in OmegaConf.load(saved) if _override_key(o) != "resume"]
    if sorted(before) != sorted(o for o in overrides if _override_key(o) != "resume"):
        raise ValueError(f"{run_dir} already holds a run with other overrides ({before}); continue it with "
                         f"resume={run_dir} or choose a new hydra.run.dir")
    if cfg is not None:
        changed = config_changes(run_dir, cfg)[2]
        if changed:
            raise ValueError(f"{run_dir} already holds a run made with another config (differs in {changed[:6]}); "
                             f"choose a new hydra.run.dir")
    return True


def config_changes(run_dir: Path, cfg: DictConfig) -> tuple[dict, dict, list[str]]:
    """``(saved, current, keys)``: the run's saved config (``config.yaml``; empty when there is none), ``cfg``
    resolved, and the dotted keys where they differ (``resume`` aside), sorted."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return {}, {}, []
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return old, new, sorted(_differences(old, new) - {"resume"})


def _differences(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return {d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


def check_resume_dir(resume: Path, run_dir: Path) -> None:
    """``resume=X`` continues X in place: a run directory elsewhere (``hydra.run.dir=Y``, or a sweep's job folder)
    would start from scratch there without X's checkpoint, so it is refused."""
    if resume.expanduser().resolve() != run_dir.resolve():
        raise ValueError(f"resume={resume} continues {resume} in place, but the run directory is {run_dir}; drop "
                         f"hydra.run.dir or set it to {resume}")


def compose_for_resume(cfg: DictConfig, task_overrides: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """Recompose the resumed run's config from its saved overrides plus the new ones, with the run's own values where
    this version's defaults differ (``keep_saved_values``)."""
    from hydra import compose

    run_dir = Path(cfg.resume).expanduser()
    overrides = resume_overrides(run_dir, task_overrides)
    cfg = compose(config_name="config", overrides=[*overrides, f"resume={run_dir}"])
    keep_saved_values(cfg, run_dir)
    return cfg, overrides


def _resumable(key: str) -> bool:
    return key.startswith(RESUMABLE_KEYS) or key in RESUMABLE_KEYS


def keep_saved_values(cfg: DictConfig, run_dir: Path) -> None:
    """Give every key of ``cfg`` outside :data:`RESUMABLE_KEYS` the value the run in ``run_dir`` was made with (its
    ``config.yaml``) where the two differ, and say so: a default changed since the run started (for instance
    ``guidance.bridge_steps``, 10 before 2026-12-07, 8 since) would otherwise change the method in the middle of the
    run, which its checkpoint continues exactly only with its own values. A key the saved config lacks (added since)
    keeps its default; one this version no longer has is named in the warning."""
    old, new, changed = config_changes(run_dir, cfg)
    kept, gone = [], []
    for key in changed:
        if key.startswith("_") or _resumable(key):
            continue
        value, default = _lookup(old, key), _lookup(new, key)
        if value is _MISSING:  # added since the run started: its default
            continue
        if default is _MISSING:
            gone.append(key)
            continue
        OmegaConf.update(cfg, key, value, merge=False)
        kept.append(f"{key}={value} (default now {default})")
    if kept or gone:
        message = (f"sdbridge: resuming {run_dir} with the values it was made with where this version's defaults "
                   f"differ: {', '.join(kept) or 'none'}"
                   + (f"; no longer in this version, dropped: {', '.join(gone)}" if gone else ""))
        log.warning(message)
        print(message, file=sys.stderr)


_MISSING = object()


def _lookup(tree: Any, key: str) -> Any:
    """The value at the dotted ``key`` of nested dicts, or ``_MISSING``."""
    for part in key.split("."):
        tree = tree.get(part, _MISSING) if isinstance(tree, dict) else _MISSING
    return tree


def _only_hydra_files(run_dir: Path) -> bool:
    return all(p.name in (".hydra", "run.lock") or p.suffix == ".log" for p in run_dir.iterdir())


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra task function (``run.py``)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return _sweep_job(cfg, hc) if _in_sweep() else _main(cfg, hc)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def _sweep_job(cfg: DictConfig, hc: Any) -> dict[str, Any] | None:
    """One job of a multirun sweep: a failure is written to the job directory's ``FAILED`` file and the sweep goes on
    with the next job (an interrupt, SIGTERM or Ctrl+C, still stops the sweep)."""
    failed = Path(hc.runtime.output_dir) / FAILED
    failed.unlink(missing_ok=True)  # a requeued job starts afresh
    try:
        return _main(cfg, hc)
    except CommandFailed as err:  # printed already
        reason, details = str(err), ""
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        reason, details = f"{type(err).__name__}: {first}", traceback.format_exc()
        log.error("sdbridge: the job failed:\n%s", details)
        print(f"sdbridge: error: {reason}", file=sys.stderr)
    write_text(failed, f"{reason}\n{details}")
    return None


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): a multirun sweep whose jobs failed ends with the list
    of them, each job directory with the one-line reason in its ``FAILED`` file, and exit status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sorted(sweep_dir.rglob(FAILED), key=lambda p: [int(t) if t.isdigit() else t
                                                                 for t in re.split(r"(\d+)", str(p))])  # job 2 < 10
        if not failed:
            return
        lines = [f"  {f.parent}: {(f.read_text().splitlines() or ['?'])[0]}" for f in failed]
        print(f"sdbridge: error: {len(failed)} job{'s' * (len(failed) > 1)} of the sweep in {sweep_dir} failed (the "
              "others ran to the end):", *lines, sep="\n", file=sys.stderr)
        sys.exit(1)


def _main(cfg: DictConfig, hc: Any) -> dict[str, Any] | None:
    run_dir = Path(hc.runtime.output_dir)
    fresh = not cfg.resume
    overrides = list(hc.overrides.task)
    if cfg.resume:
        try:
            check_resume_dir(Path(cfg.resume), run_dir)
        except ValueError as err:
            return _fail(err, run_dir)  # run_dir is not the resumed run: Hydra made it for this command
    try:
        if not cfg.resume and continues_in_place(run_dir, overrides, cfg):
            log.warning("sdbridge: %s already holds this run: continuing it from its checkpoint", run_dir)
            print(f"sdbridge: continuing the run in {run_dir} from its checkpoint", file=sys.stderr)
            cfg.resume = str(run_dir)
            fresh = False
            overrides = []  # the saved overrides are the same ones
        if cfg.resume:
            cfg, overrides = compose_for_resume(cfg, overrides)
        config = to_objects(cfg)
        check_run(config)  # devices, prompt file, local weights: refused here, before any file is written
        if not fresh:
            resumed = Path(cfg.resume).expanduser()
            for ckpt in checkpoints_of(resumed):
                read_checkpoint(ckpt)  # refuses a damaged file or one that would run code, before anything is written
            done = finished_summary(resumed, config.trainer.max_steps)
            if done is not None:
                print(f"sdbridge: {resumed} already finished at step {done['steps']}; nothing to do (raise "
                      "trainer.max_steps to continue it)", file=sys.stderr)
                return done
    except USER_ERRORS as err:
        return _fail(err, run_dir if fresh else None)
    try:
        with run_lock(run_dir):
            summary = _write_config_and_run(cfg, hc, config, run_dir, overrides, fresh)
    except RunDirectoryInUse as err:
        return _fail(err, None)  # the directory is someone else's: leave it as it is
    except NonFiniteGradientError as err:  # the run's files (checkpoints, images) stay for inspection
        return _fail(err, None)
    except (SaveFailed, WriteFailed) as err:  # a full disk: every file as it was before the failed write
        return _fail(err, None)
    except RunInterrupted as err:  # SIGTERM / Ctrl+C: stopped after a whole step, checkpointed there
        print(f"sdbridge: {err}", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    if not math.isfinite(summary.get("final_loss", 0.0)):
        return _fail(ValueError(f"the run ended with a non-finite loss ({summary['final_loss']}) at step "
                                f"{summary['steps']}: lower guidance.scale or target.optimizer.lr; its files are kept "
                                f"in {run_dir}"), None)
    if "exact_metrics" in summary:
        from sdbridge.callbacks.exact_metrics import format_metrics

        print("\nExact metrics against the true distributions (sdbridge/metrics/exact.py):")
        print(format_metrics(summary["exact_metrics"], summary.get("exact_metrics_reference")))
    print(f"\nsdbridge: {summary['steps']} steps in {summary['wall_clock_s']:.1f} s, "
          f"{summary['nfe_per_step']} NFEs/step, final loss {summary['final_loss']:.4g}")
    images = run_dir / ("batches/*/images/final" if summary.get("batches") else "images/final")
    print(f"sdbridge: images in {images}, summary in {run_dir / 'summary.json'}")
    if summary.get("compare"):
        print(f"sdbridge: {summary['compare']}: each prompt's images, and below them exact samples of the prompt")
    return summary


def _write_config_and_run(cfg: DictConfig, hc: Any, config: Any, run_dir: Path, overrides: list[str],
                          fresh: bool) -> dict[str, Any]:
    """Save config.yaml / overrides.yaml and run (under the run directory's lock)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["_choices"] = {k: v for k, v in hc.runtime.choices.items() if not k.startswith(("hydra", "schema"))}
    if str(hc.mode) == "RunMode.MULTIRUN":
        resolved["_sweep"] = Path(hc.sweep.dir).name
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml({k: v for k, v in resolved.items() if k != "_choices"}))
    write_text(run_dir / "overrides.yaml", OmegaConf.to_yaml(overrides))
    try:
        summary = run(config, run_dir, resolved)
    except USER_ERRORS as err:
        if fresh and not (run_dir / "checkpoints").exists():
            for name in ("config.yaml", "overrides.yaml"):
                (run_dir / name).unlink(missing_ok=True)
        _fail(err, run_dir if fresh else None)
    except Exception as err:
        from sdbridge.priors.stable_diffusion import PriorUnavailableError

        if isinstance(err, PriorUnavailableError):
            for name in ("config.yaml", "overrides.yaml"):
                (run_dir / name).unlink(missing_ok=True)
            _fail(err, run_dir if fresh else None)
        raise
    return summary


def _fail(err: BaseException, cleanup_dir: Path | None) -> None:
    """Print the one-line error and stop (exit status 2); a fresh run's directory that holds nothing of the run is
    removed, except in a sweep, where the job's directory keeps its ``FAILED`` file."""
    if cleanup_dir is not None and not _in_sweep() and cleanup_dir.is_dir() and _only_hydra_files(cleanup_dir):
        shutil.rmtree(cleanup_dir, ignore_errors=True)
    print(f"sdbridge: error: {err}", file=sys.stderr)
    raise CommandFailed(str(err))
