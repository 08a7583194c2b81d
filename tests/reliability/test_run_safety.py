"""A run directory is never damaged by a command that does nothing useful: re-launching a finished run, a refused
resume and a crafted checkpoint leave every file's bytes as they were (issue #15). Hydra's own job log (``run.log``)
is the one file such a command appends a line to."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from tests.conftest import run_cli


def _args(run_dir: Path, world_cache: Path, *extra: str) -> list[str]:
    return [f"hydra.run.dir={run_dir}", "prior=analytic", f"prior.cache_dir={world_cache}", "prior.size=16",
            "trainer.progress_bar=false", "trainer.max_steps=4", "trainer.checkpoint_every=2",
            "prompt.texts=[a red circle,a blue square]", "prompt.repeat=1", *extra]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "run.log"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, world_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    res = run_cli(_args(run_dir, world_cache))
    assert res.returncode == 0, res.stdout
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    for f in target.rglob("*.yaml"):  # the saved config names the original directory only through hydra.run.dir
        f.write_text(f.read_text().replace(str(run_dir), str(target)))
    return target


@pytest.fixture(scope="module")
def finished_batched_run(tmp_path_factory, world_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("safety_batched") / "run"
    res = run_cli(_args(run_dir, world_cache, "prompt.batch_size=1"))
    assert res.returncode == 0, res.stdout
    return run_dir


@pytest.mark.parametrize("batched", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_relaunching_or_resuming_a_finished_run_changes_no_file(batched, request, tmp_path, world_cache):
    finished = request.getfixturevalue("finished_batched_run" if batched else "finished_run")
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    extra = ("prompt.batch_size=1",) if batched else ()
    for args in (_args(run_dir, world_cache, *extra), [f"resume={run_dir}", f"hydra.run.dir={run_dir}"]):
        res = run_cli(args)
        assert res.returncode == 0, res.stdout
        assert "already finished at step 4; nothing to do" in res.stdout, res.stdout
        assert _snapshot(run_dir) == before


@pytest.mark.parametrize("change", ["prompt.texts=[a red circle]", "prior.size=32", "guidance.scale=3"])
def test_a_refused_resume_changes_no_file(finished_run, tmp_path, world_cache, change):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    res = run_cli([f"resume={run_dir}", f"hydra.run.dir={run_dir}", "trainer.max_steps=6", change])
    assert res.returncode == 2 and "cannot change" in res.stdout and change.split("=")[0] in res.stdout, res.stdout
    assert _snapshot(run_dir) == before
    if change.startswith("prompt"):  # still resumable (checked once: a run each)
        res = run_cli([f"resume={run_dir}", f"hydra.run.dir={run_dir}", "trainer.max_steps=6"])
        assert res.returncode == 0, res.stdout


def test_a_resume_keeps_the_values_its_run_was_made_with(finished_run, tmp_path, world_cache):
    """A default changed since the run started (simulated: its saved config.yaml says guidance.scale 11 and
    guidance.weighting uniform, today's defaults differ; and it lacks guidance.loss_reduction, a key added since): the
    resume continues with the run's values, says which, and gives the added key its default."""
    from omegaconf import OmegaConf

    run_dir = _copy(finished_run, tmp_path)
    saved = OmegaConf.load(run_dir / "config.yaml")
    default_scale, default_weighting = saved.guidance.scale, saved.guidance.weighting
    assert default_scale != 11.0 and default_weighting != "uniform"
    saved.guidance.scale, saved.guidance.weighting = 11.0, "uniform"
    del saved.guidance["loss_reduction"]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    res = run_cli([f"resume={run_dir}", f"hydra.run.dir={run_dir}", "trainer.max_steps=6"])
    assert res.returncode == 0, res.stdout
    assert f"guidance.scale=11.0 (default now {default_scale})" in res.stdout, res.stdout
    assert f"guidance.weighting=uniform (default now {default_weighting})" in res.stdout, res.stdout
    resumed = OmegaConf.load(run_dir / "config.yaml")
    assert resumed.guidance.scale == 11.0 and resumed.guidance.weighting == "uniform"
    assert resumed.guidance.loss_reduction == "sum" and resumed.trainer.max_steps == 6


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint could do with a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage", ["crafted", "truncated"])
def test_a_crafted_or_truncated_checkpoint_is_refused_without_running_it(finished_run, tmp_path, world_cache, damage):
    import torch

    run_dir = _copy(finished_run, tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    marker = tmp_path / "code-ran"
    if damage == "crafted":
        state = torch.load(ckpt, weights_only=True)
        state["sdbridge"]["payload"] = _Payload(str(marker))
        torch.save(state, ckpt, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    else:
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = _snapshot(run_dir)
    res = run_cli([f"resume={run_dir}", f"hydra.run.dir={run_dir}", "trainer.max_steps=6"])
    assert res.returncode == 2, res.stdout
    needle = "refusing to load it" if damage == "crafted" else "damaged or truncated"
    assert needle in res.stdout and str(ckpt) in res.stdout, res.stdout
    assert "Traceback" not in res.stdout
    assert not marker.exists()
    assert _snapshot(run_dir) == before


def test_a_second_run_into_a_directory_in_use_is_refused(finished_run, tmp_path, world_cache):
    """The lock names its holder; a lock whose process is gone is taken over and removed at the end."""
    import json
    import os
    import socket
    import subprocess

    run_dir = _copy(finished_run, tmp_path)
    lock = run_dir / "run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # this test process: alive
    before = _snapshot(run_dir)
    res = run_cli([f"resume={run_dir}", f"hydra.run.dir={run_dir}", "trainer.max_steps=6"])
    assert res.returncode == 2 and f"in use by another run (pid {os.getpid()}" in res.stdout, res.stdout
    assert _snapshot(run_dir) == before
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    res = run_cli([f"resume={run_dir}", f"hydra.run.dir={run_dir}", "trainer.max_steps=6"])
    assert res.returncode == 0, res.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6 and not lock.exists()


def test_a_non_finite_result_is_an_error_not_a_result(tmp_path, world_cache):
    """An infinite learning rate is refused at start; a loss that ends non-finite (guidance.scale=1e30) is a one-line
    error with the files kept, not an exit 0 that reports "final loss inf"."""
    run_dir = tmp_path / "run"
    res = run_cli(_args(run_dir, world_cache, "target.optimizer.lr=inf"))
    assert res.returncode == 2 and "target.optimizer.lr=inf must be > 0 and finite" in res.stdout, res.stdout
    assert not run_dir.exists()
    res = run_cli(_args(run_dir, world_cache, "guidance.scale=1e30", "trainer.max_steps=2"))
    assert res.returncode == 2, res.stdout
    assert "sdbridge: error:" in res.stdout and ("non-finite loss" in res.stdout or "non-finite gradient" in res.stdout)
    assert "Traceback" not in res.stdout
    assert (run_dir / "config.yaml").is_file()  # the run's files stay for inspection
