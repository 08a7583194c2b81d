"""Every method runs end to end through ``python run.py guidance=<name>`` on the tiny SD and reports its NFEs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

# expected NFEs per step over a 3-step run (None: depends on the sampled / annealed t)
EXPECTED = {
    "sds": 2.0,
    "nfsd": 3.0,
    "csd": 2.0,
    "bridge": 2.0,
    "sdi": None,
    "sdi_cached": 2 / 3,  # refreshed at step 0 only (refresh_every 25)
    "ism": None,
    "vsd": 3.0,
    "vsd_full_bridge": 24.0,  # 8 inversion steps with the LoRA (1) + 8 generation steps with CFG (2)
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_method_runs_three_steps_on_tiny_sd(tmp_path, tiny_cache, name):
    extra = ["guidance.stage_two_start_step=1"] if name == "bridge" else []
    res = run_cli([f"hydra.run.dir={tmp_path / 'run'}", "prior=tiny_sd", f"prior.cache_dir={tiny_cache}",
                   "prior.device=cpu", f"guidance={name}", "trainer.max_steps=3", "trainer.progress_bar=false",
                   "prompt.texts=[a dog,a red car]", "prompt.repeat=1", *extra])
    assert res.returncode == 0, res.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["guidance"] == name and summary["steps"] == 3
    print(f"{name}: {summary['nfe_per_step']} NFEs/step")
    if EXPECTED[name] is not None:
        assert summary["nfe_per_step"] == pytest.approx(EXPECTED[name], abs=1e-3)
    else:
        assert summary["nfe_per_step"] > 3
    assert len(summary["images"]) == 2
