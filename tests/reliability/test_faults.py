"""A full disk costs a run nothing but the steps since its last checkpoint, and one failed job of a sweep costs the
sweep nothing else (issue #15).

Every file is written atomically (sdbridge/files.py); a write that fails stops the run with one line naming the file,
the previous checkpoint loads and the resume ends bit-identical to a run straight through. The fault is injected by
:func:`fail_writes` (the n-th write of a file fails with ENOSPC after its temporary file was written); the runs are
the smallest of the exact prior, in process except the CLI checks.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from sdbridge import files
from sdbridge.config import to_objects
from sdbridge.files import WriteFailed, atomic_open, write_text
from sdbridge.runner import SaveFailed, read_checkpoint, run
from tests.conftest import ROOT, compose, run_cli

ENOSPC = os.strerror(errno.ENOSPC)


def fail_writes(pattern: str, nth: int = 1, patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """From now on the ``nth`` atomic write of a file whose name matches ``pattern`` fails with ENOSPC once its
    temporary file is written (a disk that fills up during the write); ``patch``: ``monkeypatch.setattr`` in a test."""
    real = files.atomic_path
    count = itertools.count(1)

    @contextlib.contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
            if fnmatch.fnmatch(Path(path).name, pattern) and next(count) == nth:
                raise OSError(errno.ENOSPC, ENOSPC)

    patch(files, "atomic_path", atomic_path)


#: ``python -c DRIVER PATTERN N ARGS...``: ``run.py ARGS`` with :func:`fail_writes(PATTERN, N)`
DRIVER = ("import runpy, sys; from tests.reliability.test_faults import fail_writes; "
          "fail_writes(sys.argv[1], int(sys.argv[2])); sys.argv = ['run.py', *sys.argv[3:]]; "
          "runpy.run_path('run.py', run_name='__main__')")


def _args(world_cache: Path, *extra: str) -> list[str]:
    return ["prior=analytic", f"prior.cache_dir={world_cache}", "prior.size=16", "trainer.progress_bar=false",
            "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.save_every=2",
            "prompt.texts=[a red circle,a blue square]", "prompt.repeat=1", *extra]


def _run(prior: Any, world_cache: Path, run_dir: Path, *extra: str) -> dict[str, Any]:
    return run(to_objects(compose(_args(world_cache, *extra))), run_dir, prior=prior)


def _leftovers(*folders: Path) -> list[Path]:
    """Temporary files of atomic writes (``.<name>.<pid>.tmp<suffix>``), or any file in a temporary folder."""
    return [p for p in folders[0].rglob(".*.tmp*")] + [p for d in folders[1:] for p in d.rglob("*") if p.is_file()]


def _result(run_dir: Path) -> tuple[int, torch.Tensor, dict[str, Any], float, bytes]:
    """What a run ends with: step, parameters, optimizer state, final loss, final grid."""
    import json

    state = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    summary = json.loads((run_dir / "summary.json").read_text())
    return (state["global_step"], state["state_dict"]["target.param"], state["optimizer_states"][0]["state"][0],
            summary["final_loss"], (run_dir / "images" / "final" / "grid.png").read_bytes())


@pytest.fixture(scope="module")
def prior(world_cache):
    """The runs' exact prior, built once (as the benchmarks reuse one)."""
    from sdbridge.priors import build_prior

    return build_prior(to_objects(compose(_args(world_cache))).prior)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, prior, world_cache):
    run_dir = tmp_path_factory.mktemp("faults") / "straight"
    _run(prior, world_cache, run_dir)
    return _result(run_dir)


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """$TMPDIR for the test: Lightning's checkpoint writer used to leave a temporary file there per failed save."""
    import tempfile

    folder = tmp_path / "TMPDIR"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# ------------------------------------------------------------------------------------------------ the helper
def test_an_atomic_write_replaces_the_file_only_when_it_succeeds(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text(target, "old")
    assert target.read_text() == "old"
    with pytest.raises(WriteFailed, match=f"could not write {re.escape(str(target))}: {ENOSPC}") as info:
        with atomic_open(target, "w") as f:
            f.write("new, half written")
            raise OSError(errno.ENOSPC, ENOSPC)
    assert info.value.errno == errno.ENOSPC and info.value.path == target
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]
    with pytest.raises(KeyError):  # not a write error: passed on as it is, the file unchanged all the same
        with atomic_open(target, "w") as f:
            f.write("new")
            raise KeyError("x")
    assert target.read_text() == "old" and len(list(target.parent.iterdir())) == 1
    with pytest.raises(WriteFailed):  # a new file that fails is not created at all
        with atomic_open(tmp_path / "b.bin") as f:
            raise OSError(errno.ENOSPC, ENOSPC)
    assert not (tmp_path / "b.bin").exists()
    write_text(target, "new")
    assert target.read_text() == "new" and len(list(target.parent.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ a full disk
@pytest.mark.parametrize("pattern, nth, step", [
    ("last.ckpt", 2, 2),  # the checkpoint of step 4: the one of step 2 is kept
    ("step_*.png", 2, 2),  # the grid of step 4, before its checkpoint
    ("metrics.csv", 1, 6),  # the log, written when training ends
    ("grid.png", 1, 6),  # the final grid: the export after the last step
    ("model_samples.pt", 1, 6),
    ("summary.json", 1, 6),  # the last file of a run
])
def test_a_full_disk_keeps_the_previous_checkpoint_and_the_resume_is_exact(pattern, nth, step, straight, prior,
                                                                          tmp_path, tmpdir_env, world_cache,
                                                                          monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patched:
        fail_writes(pattern, nth, patched.setattr)
        with pytest.raises(SaveFailed) as info:
            _run(prior, world_cache, run_dir)
    what = "checkpoint " if pattern.endswith(".ckpt") else ""
    message = str(info.value)
    assert re.fullmatch(rf"could not write {what}{re.escape(str(run_dir))}/\S*{pattern.replace('*', '.*')}: {ENOSPC}; "
                        rf"the previous checkpoint at step {step} is kept; resume with resume={re.escape(str(run_dir))}",
                        message), message
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step
    assert not _leftovers(run_dir, tmpdir_env)
    assert not (run_dir / "summary.json").exists()
    summary = _run(prior, world_cache, run_dir, f"resume={run_dir}")
    assert summary["resumed_from_step"] == step
    got, want = _result(run_dir), straight
    assert got[0] == want[0] == 6 and torch.equal(got[1], want[1]) and got[3] == want[3] and got[4] == want[4]
    assert all(torch.equal(got[2][k], want[2][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert not _leftovers(run_dir, tmpdir_env)


@pytest.mark.parametrize("pattern, nth", [("last.ckpt", 2), pytest.param("metrics.csv", 1, marks=pytest.mark.slow)])
def test_a_full_disk_is_one_line_and_a_non_zero_exit(pattern, nth, tmp_path, tmpdir_env, world_cache):
    """``python run.py``: the one-line error, exit 2, no traceback, no temporary file (here or in $TMPDIR)."""
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", DRIVER, pattern, str(nth), f"hydra.run.dir={run_dir}",
                          *_args(world_cache)], cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir_env)})
    assert res.returncode == 2, res.stdout
    errors = [line for line in res.stdout.splitlines() if line.startswith("sdbridge: error:")]
    what = "checkpoint " if pattern.endswith(".ckpt") else ""
    assert errors == [f"sdbridge: error: could not write {what}{run_dir / ('checkpoints' if what else 'logs') / pattern}"
                      f": {ENOSPC}; the previous checkpoint at step {2 if what else 6} is kept; resume with "
                      f"resume={run_dir}"], res.stdout
    assert "Traceback" not in res.stdout
    assert not _leftovers(run_dir, tmpdir_env)
    read_checkpoint(run_dir / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------------------------------------------ sweeps
def test_a_sweep_goes_on_past_a_failed_job_and_lists_it(tmp_path, world_cache):
    """Jobs 0 and 2 have an impossible learning rate: each gets a FAILED file with its reason, jobs 1 and 3 run to
    the end, the sweep ends with the list of both failed jobs and exit 1."""
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", "prior=analytic",
                   f"prior.cache_dir={world_cache}", "prior.size=16", "trainer.progress_bar=false",
                   "trainer.max_steps=2", "logger=none", "prompt.texts=[a red circle]", "prompt.repeat=1",
                   "eval.exact=false", "target.optimizer.lr=-1,0.01,-2,0.02"])
    assert res.returncode == 1, res.stdout
    reasons = {job: f"target.optimizer.lr={lr} must be > 0 and finite" for job, lr in (("0", -1.0), ("2", -2.0))}
    for job, reason in reasons.items():
        assert (sweep / job / "FAILED").read_text().splitlines()[0] == reason
        assert not (sweep / job / "summary.json").exists()
    for job in ("1", "3"):
        assert (sweep / job / "summary.json").is_file() and not (sweep / job / "FAILED").exists()
    report = res.stdout[res.stdout.index(f"sdbridge: error: 2 jobs of the sweep in {sweep} failed"):].splitlines()
    assert report[1:] == [f"  {sweep / job}: {reason}" for job, reason in reasons.items()], res.stdout
    assert "Traceback" not in res.stdout


def test_a_killed_writers_temporary_files_are_removed_under_the_lock(tmp_path):
    """kill -9 in the middle of an atomic write leaves ``.<stem>.<pid>.tmp<suffix>``; the next run that takes the
    directory's lock removes it (and nothing else)."""
    from sdbridge.runner import run_lock

    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.4242.tmp.ckpt", tmp_path / ".summary.17.tmp.json"]
    kept = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / ".hidden", tmp_path / "notes.tmp.txt"]
    for p in stale + kept:
        p.write_bytes(b"x")
    with run_lock(tmp_path):
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_damaged_batch_summary_is_redone_from_its_checkpoint(tmp_path, tiny_cache, caplog):
    """A run in batches whose finished batch lost its summary.json (truncated) is completed again by a resume: that
    batch is finished from its checkpoint at the last step (no step retrained), with a warning naming the file."""
    from sdbridge.config import to_objects
    from sdbridge.runner import run
    from tests.conftest import compose

    def cfg(*extra):
        return to_objects(compose(["prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "prior.device=cpu",
                                   "trainer.progress_bar=false", "logger=none", "trainer.max_steps=4",
                                   "trainer.checkpoint_every=2", "prompt.texts=[a dog,a cat]", "prompt.batch_size=1",
                                   *extra]))

    run_dir = tmp_path / "run"
    first = run(cfg(), run_dir)
    damaged = run_dir / "batches" / "0000" / "summary.json"
    good = damaged.read_text()
    damaged.write_text(good[: len(good) // 2])
    with caplog.at_level("WARNING", logger="sdbridge"):
        again = run(cfg(f"resume={run_dir}"), run_dir)
    assert f"{damaged} cannot be read" in caplog.text
    assert json.loads(damaged.read_text())["steps"] == 4 and again["steps"] == first["steps"] == 4
    assert again["final_loss"] == first["final_loss"]
