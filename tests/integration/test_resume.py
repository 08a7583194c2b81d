"""A run stopped at step k and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from sdbridge.runner import run
from sdbridge.config import to_objects
from tests.conftest import compose, run_cli


class StopAt(L.Callback):
    """Ends training after step k: gracefully (``should_stop``) or like a killed job (an exception mid-run)."""

    def __init__(self, k: int, kill: bool = False):
        self.k, self.kill = k, kill

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.k:
            if self.kill:
                raise RuntimeError("simulated kill")
            trainer.should_stop = True


def _config(tiny_cache, *extra):
    return to_objects(compose(["prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "prior.device=cpu", "trainer.progress_bar=false",
                               "logger=none", "trainer.max_steps=12", "trainer.checkpoint_every=4",
                               "prompt.texts=[a dog,a cat]", "guidance.stage_two_start_step=6", *extra]))


def _final(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("kill", [False, True])
def test_stop_and_resume_is_bit_identical(tmp_path, tiny_cache, kill):
    full = tmp_path / "full"
    run(_config(tiny_cache), full)
    part = tmp_path / "part"
    if kill:  # dies after step 6: only the periodic checkpoint of step 4 survives
        with pytest.raises(RuntimeError, match="simulated kill"):
            run(_config(tiny_cache), part, callbacks=[StopAt(6, kill=True)])
        expected_step = 4
    else:  # stopped after step 5: the final checkpoint is written
        run(_config(tiny_cache), part, callbacks=[StopAt(5)])
        expected_step = 5
    assert _final(part)["global_step"] == expected_step
    summary = run(_config(tiny_cache, f"resume={part}"), part)
    assert summary["resumed_from_step"] == expected_step and summary["steps"] == 12
    a, b = _final(full), _final(part)
    assert a["global_step"] == b["global_step"] == 12
    assert torch.equal(a["state_dict"]["target.param"], b["state_dict"]["target.param"])
    sa, sb = a["optimizer_states"][0]["state"][0], b["optimizer_states"][0]["state"][0]
    assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert torch.equal(a["sdbridge"]["generator_state"], b["sdbridge"]["generator_state"])
    assert a["sdbridge"]["total_nfe"] == b["sdbridge"]["total_nfe"] == 24


def test_cli_resume_extends_a_finished_run(tmp_path, tiny_cache):
    common = ["prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "trainer.progress_bar=false", "prior.device=cpu",
              "trainer.checkpoint_every=3", "trainer.log_every=1"]
    short = tmp_path / "short"
    assert run_cli([*common, f"hydra.run.dir={short}", "trainer.max_steps=6"]).returncode == 0
    res = run_cli([f"resume={short}", "trainer.max_steps=10", "trainer.progress_bar=false"])
    assert res.returncode == 0, res.stdout
    straight = tmp_path / "straight"
    assert run_cli([*common, f"hydra.run.dir={straight}", "trainer.max_steps=10"]).returncode == 0
    assert torch.equal(_final(short)["state_dict"]["target.param"], _final(straight)["state_dict"]["target.param"])
    summary = json.loads((short / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6 and summary["steps"] == 10
    # the metric log keeps the first 6 steps' rows and appends the rest: the same log as the straight run's
    # (the same rows and values; the epoch counter and the wall-clock summary columns differ)
    def training_rows(run_dir):
        import csv

        rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
        return [(r["step"], r["loss"], r["grad_norm"], r["t"], r["nfe_total"]) for r in rows if r["loss"]]

    assert [r[0] for r in training_rows(short)] == [str(k) for k in range(10)]
    assert training_rows(short) == training_rows(straight)
    # the group of a resumed run cannot change
    bad = run_cli([f"resume={short}", "guidance=sds"])
    assert bad.returncode != 0 and "cannot change 'guidance'" in bad.stdout


@pytest.mark.parametrize("guidance", ["vsd", "sdi_cached"])
def test_kill_and_resume_of_stateful_guidances_is_bit_identical(tmp_path, tiny_cache, guidance):
    """VSD (LoRA weights and their optimizer) and cached SDI (the cached prediction) keep state across steps."""
    def cfg(*extra):
        return to_objects(compose(["prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "prior.device=cpu",
                                   "trainer.progress_bar=false", "logger=none", "trainer.max_steps=10",
                                   "trainer.checkpoint_every=4", "prompt.texts=[a dog,a cat]",
                                   f"guidance={guidance}", *(["guidance.refresh_every=3"] if guidance == "sdi_cached"
                                                              else []), *extra]))

    full = tmp_path / "full"
    run(cfg(), full)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(cfg(), part, callbacks=[StopAt(6, kill=True)])
    summary = run(cfg(f"resume={part}"), part)
    assert summary["resumed_from_step"] == 4
    a, b = _final(full), _final(part)
    assert torch.equal(a["state_dict"]["target.param"], b["state_dict"]["target.param"])
