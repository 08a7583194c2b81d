"""Fault injection: a run killed at random steps, resumed each time, ends bit-identical to a run straight through.

``test_killed_at_ten_random_steps_resumes_bit_identically`` kills in-process (an exception at the end of the step,
after which only what is on disk survives) and runs in ``make test``; ``test_sigkill_at_random_moments`` sends a real
``kill -9`` to ``python run.py`` at random moments (mid-step, mid-checkpoint write) and runs in ``make test-slow``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdbridge.config import to_objects
from sdbridge.runner import run
from tests.conftest import compose
from tests.integration.test_resume import StopAt

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24


def _overrides(tiny_cache, steps: int = STEPS) -> list[str]:
    return ["prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "prior.device=cpu", "trainer.progress_bar=false",
            f"trainer.max_steps={steps}", "trainer.checkpoint_every=1", "trainer.save_every=0",
            "prompt.texts=[a dog,a cat]", f"guidance.stage_two_start_step={steps // 2}"]


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _assert_same_run(a_dir: Path, b_dir: Path, steps: int = STEPS) -> None:
    a, b = _state(a_dir), _state(b_dir)
    assert a["global_step"] == b["global_step"] == steps
    assert torch.equal(a["state_dict"]["target.param"], b["state_dict"]["target.param"])
    sa, sb = a["optimizer_states"][0]["state"][0], b["optimizer_states"][0]["state"][0]
    assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert torch.equal(a["sdbridge"]["generator_state"], b["sdbridge"]["generator_state"])
    assert a["sdbridge"]["total_nfe"] == b["sdbridge"]["total_nfe"]


def _training_rows(run_dir: Path) -> list[str]:
    """metrics.csv's rows of training steps (the step column and the loss), in order."""
    lines = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    step, loss = header.index("step"), header.index("loss")
    rows = [line.split(",") for line in lines[1:]]
    return [f"{r[step]}:{r[loss]}" for r in rows if r[loss] != ""]


def test_killed_at_ten_random_steps_resumes_bit_identically(tmp_path, tiny_cache):
    """Ten kills at random steps (a fixed draw, both Bridge stages), each followed by ``resume=<dir>``: the final
    latents, Adam moments, generator state and NFE count equal those of the run straight through, and
    metrics.csv holds each training step once, with the same losses."""
    full = tmp_path / "full"
    run(to_objects(compose(_overrides(tiny_cache))), full)
    kills = sorted(random.Random(15).sample(range(1, STEPS - 1), 10))
    part = tmp_path / "part"
    for i, k in enumerate(kills):
        resume = [f"resume={part}"] if i else []
        with pytest.raises(RuntimeError, match="simulated kill"):
            run(to_objects(compose(_overrides(tiny_cache) + resume)), part, callbacks=[StopAt(k, kill=True)])
        # Lightning runs checkpoint callbacks last, so the kill at the end of step k leaves the checkpoint of k - 1
        # (none when k = 1: the resume then starts over)
        if k > 1:
            assert _state(part)["global_step"] == k - 1
    summary = run(to_objects(compose(_overrides(tiny_cache) + [f"resume={part}"])), part)
    assert summary["steps"] == STEPS and summary["resumed_from_step"] >= kills[-1] - 1
    _assert_same_run(full, part)
    assert _training_rows(part) == _training_rows(full) and len(_training_rows(full)) >= 2
    assert not [p for p in part.rglob("*") if ".tmp" in p.name]


SLOW_STEPS = 150  # enough that ten launches, each killed a fraction of a second after its first checkpoint, end early


def _launch(run_dir: Path, tiny_cache, resume: bool) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "run.py"), *_overrides(tiny_cache, SLOW_STEPS), f"hydra.run.dir={run_dir}"]
    if resume:
        args.append(f"resume={run_dir}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, tiny_cache):
    """``kill -9`` of ``python run.py`` ten times, each at a random moment once training has started (so some land
    mid-step and some mid-write of a checkpoint), each followed by ``resume=<dir>``: the run finishes with the same
    final state as one straight through, and no temporary file is left in the run directory."""
    full = tmp_path / "full"
    done = _launch(full, tiny_cache, resume=False)
    assert done.wait(600) == 0, done.stdout.read().decode()
    part, draw = tmp_path / "part", random.Random(9)
    kills = 0
    for attempt in range(40):
        proc = _launch(part, tiny_cache, resume=attempt > 0)
        if kills < 10:
            ckpt = part / "checkpoints" / "last.ckpt"
            before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:  # wait until this launch writes a checkpoint
                if ckpt.exists() and ckpt.stat().st_mtime_ns != before:
                    break
                time.sleep(0.02)
            time.sleep(draw.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(60)
                kills += 1
                continue
        out = proc.communicate(timeout=600)[0].decode()
        assert proc.returncode == 0, out
        if _state(part)["global_step"] == SLOW_STEPS:
            break
    assert kills == 10
    _assert_same_run(full, part, SLOW_STEPS)
    leftovers = [p for p in part.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("tmp"))]
    assert not leftovers, leftovers
