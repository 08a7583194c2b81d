"""``python run.py`` end to end on the tiny SD: files written, bad input refused cleanly."""

from __future__ import annotations

import json

import imageio.v3 as iio
import pytest
import yaml

from tests.conftest import run_cli


def _args(tmp_path, tiny_cache, *extra):
    return [f"hydra.run.dir={tmp_path / 'run'}", "prior=tiny_sd", f"prior.cache_dir={tiny_cache}",
            "trainer.progress_bar=false", "prior.device=cpu", *extra]


@pytest.mark.parametrize("parameterization", ["latent", "pixel"])
def test_five_step_run_writes_images_config_and_summary(tmp_path, tiny_cache, parameterization):
    res = run_cli(_args(tmp_path, tiny_cache, "trainer.max_steps=5", "trainer.save_every=2",
                        f"target.parameterization={parameterization}", "prompt.texts=[a dog,a red car]",
                        "prompt.repeat=2", "trainer.video_every=2", "trainer.log_every=1"))
    assert res.returncode == 0, res.stdout
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["nfe_total"] == 10 and summary["nfe_per_step"] == 2.0
    assert summary["prompts"] == ["a dog", "a dog", "a red car", "a red car"]
    assert len(summary["images"]) == 4
    for p in summary["images"]:
        img = iio.imread(p)
        assert img.shape == (64, 64, 3)
    assert iio.imread(run / "images" / "final" / "grid.png").ndim == 3
    assert (run / "images" / "step_000002.png").is_file() and (run / "images" / "step_000004.png").is_file()
    assert (run / "video.mp4").stat().st_size > 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["target"]["parameterization"] == parameterization and config["guidance"]["scale"] == 40.0
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"loss", "grad_norm", "t", "nfe"} <= set(header) and len(rows) >= 6


def _assert_failed_cleanly(res, run_dir, *needles):
    assert res.returncode != 0, res.stdout
    for needle in needles:
        assert needle in res.stdout, res.stdout
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


@pytest.mark.parametrize(
    "override, needles",
    [
        ("guidance=nope", ["Could not find 'guidance/nope'", "Available options", "sds"]),
        ("guidance.scal=3", ["scal", "BridgeConfig"]),
        ("target.optimizer.lr=-0.01", ["target.optimizer.lr", "must be > 0"]),
        ("prior=sd21_base", ["stabilityai/stable-diffusion-2-1-base", "not available", "prior=tiny_sd"]),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message_and_no_outputs(tmp_path, tiny_cache, override, needles):
    res = run_cli(_args(tmp_path, tiny_cache, "trainer.max_steps=2", override), timeout=120)
    _assert_failed_cleanly(res, tmp_path / "run", *needles)


def test_empty_prompt_list_fails_cleanly(tmp_path, tiny_cache):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    res = run_cli(_args(tmp_path, tiny_cache, "trainer.max_steps=2", f"prompt.file={empty}"), timeout=120)
    _assert_failed_cleanly(res, tmp_path / "run", "holds no prompts")


def test_wandb_logger_runs_offline_and_logs_media(tmp_path, tiny_cache):
    res = run_cli(_args(tmp_path, tiny_cache, "logger=wandb", "trainer.max_steps=4", "trainer.save_every=2",
                        "trainer.log_every=1"), env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stdout
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and list((runs[0] / "files" / "media" / "images").rglob("*.png"))


def test_default_run_on_the_exact_prior_reports_exact_metrics(tmp_path, world_cache):
    res = run_cli([f"hydra.run.dir={tmp_path / 'run'}", f"prior.cache_dir={world_cache}", "trainer.progress_bar=false",
                   "trainer.max_steps=20"])
    assert res.returncode == 0, res.stdout
    assert "Exact metrics against the true distributions" in res.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["prior"] == "analytic" and summary["num_images"] == 16
    metrics = summary["exact_metrics"]
    assert set(metrics["per_prompt"]) == {"a red circle", "a blue square", "a yellow triangle", "a green ring"}
    assert set(metrics["mean"]) == {"fd", "nll_bpd", "collapse", "sharpness", "saturation", "adherence", "recognizable"}
    assert iio.imread(summary["images"][0]).shape == (32, 32, 3)
    # the printed table reads at a person's precision and ends with the reference row: as many exact samples of the
    # same prompts (those of compare.png), which after 20 steps from noise score far better than the images
    table = res.stdout[res.stdout.index("Exact metrics against"):]
    mean_row = next(line for line in table.splitlines() if line.startswith("mean "))
    assert mean_row.split()[1] == f"{metrics['mean']['fd']:.0f}"
    reference = summary["exact_metrics_reference"]
    assert set(reference["per_prompt"]) == set(metrics["per_prompt"])
    assert reference["mean"]["fd"] < metrics["mean"]["fd"] and reference["mean"]["recognizable"] >= 0.5
    exact_row = next(line for line in table.splitlines() if line.startswith("exact samples "))
    assert exact_row.split()[2] == f"{reference['mean']['fd']:.0f}" and "lower is better" in table


def test_unknown_prompt_word_on_the_exact_prior_fails_cleanly(tmp_path, world_cache):
    res = run_cli([f"hydra.run.dir={tmp_path / 'run'}", f"prior.cache_dir={world_cache}", "trainer.max_steps=2",
                   "prompt.text=a red banana"], timeout=120)
    _assert_failed_cleanly(res, tmp_path / "run", "banana", "Vocabulary", "circle")


def test_slow_export_counts_as_export_not_training(tmp_path, world_cache, monkeypatch):
    """ms_per_step and wall_clock_s time the steps only: a final export that takes 1.5 s more lands in export_s."""
    import time

    from sdbridge.callbacks.media import MediaCallback
    from sdbridge.runner import run
    from sdbridge.config import to_objects
    from tests.conftest import compose

    slow_export = 1.5
    real_end = MediaCallback.on_train_end

    def on_train_end(self, trainer, pl_module):
        time.sleep(slow_export)
        return real_end(self, trainer, pl_module)

    monkeypatch.setattr(MediaCallback, "on_train_end", on_train_end)
    config = to_objects(compose([f"prior.cache_dir={world_cache}", "logger=none", "trainer.progress_bar=false",
                                 "trainer.max_steps=4", "trainer.checkpoint_every=0", "trainer.save_every=0",
                                 "prompt.texts=[a red circle]", "prompt.repeat=2"]))
    start = time.perf_counter()
    summary = run(config, tmp_path / "run")
    total = time.perf_counter() - start
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["ms_per_step"] == summary["ms_per_step"] and on_disk["setup_s"] == summary["setup_s"]
    assert summary["export_s"] >= slow_export
    training = summary["ms_per_step"] * summary["steps"] / 1000
    assert abs(training - summary["wall_clock_s"]) < 1e-2  # one definition: the steps' time / steps
    assert training + slow_export < total  # the sleep is not in the steps' time
    # both are rounded to the millisecond from the same unrounded time, so they agree to one rounding step
    assert abs(summary["time_per_image_s"] - summary["wall_clock_s"] / 2) <= 1e-3
