"""experiments/exact/learned_prior.py: a denoiser trained on the exact world, run in place of the closed form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "experiments" / "exact" / "learned_prior.py"


def script(*args, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_train_then_run_with_the_learned_eps(world_cache, tmp_path):
    ckpt = tmp_path / "learned.pt"
    trained = script("train", "--out", ckpt, "--steps", "3", "--batch", "4", "--per-prompt", "2",
                     "--channels", "16", "32", "--cache-dir", world_cache)
    assert trained.returncode == 0, trained.stderr[-2000:]
    # the report compares the network's diffusion loss with the closed form's at each t
    assert "t 500: diffusion loss network" in trained.stdout and ckpt.is_file()
    out = tmp_path / "run"
    ran = script("run", ckpt, "guidance=sds", "prompt.text=a red circle", "trainer.max_steps=2", "logger=none",
                 "trainer.progress_bar=false", "trainer.save_every=0", "trainer.checkpoint_every=0",
                 f"hydra.run.dir={out}")
    assert ran.returncode == 0, ran.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exact_metrics"]["mean"]["fd"] > 0  # scored against the world's exact distribution
    # a prompt the network never saw fails with the ones it knows
    unknown = script("run", ckpt, "guidance=sds", 'prompt.text="a red star, blurry"', "trainer.max_steps=1",
                     "logger=none", "trainer.progress_bar=false", f"hydra.run.dir={tmp_path / 'bad'}")
    assert unknown.returncode != 0 and "was not trained on" in unknown.stderr
