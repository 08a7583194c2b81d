"""SIGTERM (a scheduler's stop) and Ctrl+C stop a run after the step in progress, checkpoint it at that step and exit
143 with "interrupted at step N; resume with resume=<dir>"; the resume continues exactly (issue #15)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, run_cli


def _args(run_dir, world_cache, max_steps):
    return [f"hydra.run.dir={run_dir}", "prior=analytic", f"prior.cache_dir={world_cache}", "prior.size=16",
            "guidance=sds", "trainer.progress_bar=false", f"trainer.max_steps={max_steps}", "logger=none",
            "trainer.checkpoint_every=100000", "trainer.save_every=5", "prompt.texts=[a red circle]",
            "prompt.repeat=1"]


def _param(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return state["global_step"], state["state_dict"]["target.param"]


@pytest.mark.slow  # 3 runs per signal (~40 s each): in make test-slow, to keep make test under 15 minutes
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_at_the_interrupt_and_the_resume_is_exact(sig, tmp_path, world_cache):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *_args(run_dir, world_cache, 100000)],
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (run_dir / "images" / "step_000010.png").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    found = re.search(r"interrupted at step (\d+); resume with resume=(\S+)", out)
    assert found and found.group(2) == str(run_dir), out
    assert "Traceback" not in out
    step, _ = _param(run_dir)
    assert step == int(found.group(1)) >= 10  # the checkpoint is the interrupted step
    res = run_cli([f"resume={run_dir}", f"hydra.run.dir={run_dir}", f"trainer.max_steps={step + 3}"])
    assert res.returncode == 0, res.stdout
    straight = tmp_path / "straight"
    assert run_cli(_args(straight, world_cache, step + 3)).returncode == 0
    (a_step, a), (b_step, b) = _param(run_dir), _param(straight)
    assert a_step == b_step == step + 3 and torch.equal(a, b)
