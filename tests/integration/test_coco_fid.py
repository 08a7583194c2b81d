"""The COCO-FID protocol end to end on a fake mini-COCO: sweep, shards, batches, summaries, W&B, the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, run_cli
from tests.unit.test_prompt_sets import make_fake_coco
from tests.wandb_offline import read_run


def tiny_features(device):
    """A second pluggable extractor ("module:function"): clean-fid's resize to 32x32, then raw RGB means + stds
    of a 4x4 grid of cells (96-d)."""
    from cleanfid.resize import make_resizer

    from sdbridge.metrics.fid import FeatureExtractor

    class CellStats(FeatureExtractor):
        name = "cell_stats"
        resize = staticmethod(make_resizer("PIL", False, "bicubic", (32, 32)))

        def __call__(self, batch):
            cells = batch.reshape(batch.shape[0], 3, 4, 8, 4, 8)
            return torch.cat([cells.mean((3, 5)).flatten(1), cells.std((3, 5)).flatten(1)], dim=1)

    return CellStats()


def _independent_fid(generated: list[str], real: list[str], extractor, crop_real: bool) -> float:
    """FID recomputed without sdbridge.metrics.fid: clean-fid's feature pipeline, numpy statistics, and the trace term
    from the eigenvalues of the (non-symmetric) product S1 S2."""
    from cleanfid.fid import get_files_features

    def center_crop(x):
        s = min(x.shape[:2])
        top, left = (x.shape[0] - s) // 2, (x.shape[1] - s) // 2
        return x[top : top + s, left : left + s]

    def feats(files, crop):
        return get_files_features(files, model=extractor, num_workers=0, batch_size=8, device=torch.device("cpu"),
                                  custom_fn_resize=extractor.resize, custom_image_tranform=center_crop if crop else None,
                                  verbose=False).astype(np.float64)

    a, b = feats(generated, False), feats(real, crop_real)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


@pytest.mark.slow
def test_local_sweep_of_two_methods_over_two_shards_gives_the_table(tmp_path):
    coco = make_fake_coco(tmp_path / "coco")
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", "hydra/launcher=local", "experiment=coco_fid_2d", "prior=analytic", "guidance=sds,csd",
                   "prompt.num=4", "prompt.batch_size=1", "prompt.num_shards=2", "prompt.shard=0,1",
                   "trainer.max_steps=15", "trainer.checkpoint_every=0", "logger=none", "trainer.progress_bar=false",
                   f"hydra.sweep.dir={sweep}"], env={"COCO_ROOT": str(coco)}, timeout=600)
    assert res.returncode == 0, res.stdout
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4
    for s in summaries:  # per-run cost accounting
        assert s["num_images"] == 2 and s["batches"] == 2 and s["steps"] == 15
        assert s["time_per_image_s"] == pytest.approx(s["wall_clock_s"] / 2, rel=1e-3)
        assert s["nfe_per_step"] == 2.0 and s["peak_memory_mb"] > 0 and s["peak_memory_kind"] == "rss"
        for sample in s["samples"]:  # caption id -> output file
            assert Path(sample["file"]).is_file() and sample["key"] == str(sample["caption_id"])

    res = run_cli_table(sweep, "--fid", "random_cnn", "--clip-fid", "tests.integration.test_coco_fid:tiny_features",
                        "--cache", str(tmp_path / "fid_cache"))
    assert res.returncode == 0, res.stderr
    table = json.loads((sweep / "table.json").read_text())
    assert (sweep / "table.md").read_text().startswith("| method | FID | CLIP-FID |")
    csv_rows = (sweep / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("method,images,time_per_image_s")
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"sds", "csd"}
    from sdbridge.metrics.fid import build_extractor

    for method, row in rows.items():
        mine = [s for s in summaries if s["guidance"] == method]
        samples = [x for s in mine for x in s["samples"]]
        assert row["images"] == 4 and row["shards"] == "2/2" and len({x["key"] for x in samples}) == 4
        assert row["time_per_image_s"] == pytest.approx(sum(s["wall_clock_s"] for s in mine) / 4)
        assert row["nfe_per_iteration"] == pytest.approx(2.0)
        generated, real = [x["file"] for x in samples], [x["image"] for x in samples]
        for column, extractor in (("fid", build_extractor("random_cnn", "cpu")), ("clip_fid", tiny_features("cpu"))):
            expected = _independent_fid(generated, real, extractor, crop_real=True)
            assert row[column] == pytest.approx(expected, rel=1e-4, abs=1e-6), (method, column)
    assert rows["sds"]["fid"] != pytest.approx(rows["csd"]["fid"])

    # a run under another protocol (more steps) is refused, not mixed in silently
    other = sweep / "9_other"
    res = run_cli(["experiment=coco_fid_2d", "prior=analytic", "guidance=sds", "prompt.num=4", "prompt.batch_size=4",
                   "trainer.max_steps=3", "logger=none", "trainer.progress_bar=false", f"hydra.run.dir={other}"],
                  env={"COCO_ROOT": str(coco)})
    assert res.returncode == 0, res.stdout
    res = run_cli_table(sweep, "--fid", "random_cnn", "--clip-fid", "none", "--cache", str(tmp_path / "fid_cache"))
    assert res.returncode == 2 and "different protocols" in res.stderr and "steps: 15 vs 3" in res.stderr
    res = run_cli_table(sweep, "--fid", "random_cnn", "--clip-fid", "none", "--cache", str(tmp_path / "fid_cache"),
                        "--by-protocol")
    assert res.returncode == 0 and (sweep / "table_0.md").is_file() and (sweep / "table_1.md").is_file()


def run_cli_table(sweep: Path, *args: str):
    import os
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / "experiments" / "coco_fid" / "make_table.py"), str(sweep), *args],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _final_latents(config_overrides, run_dir):
    """Run in-process; returns the optimized parameters of every sample, in prompt order."""
    import lightning as L

    from sdbridge.runner import run
    from sdbridge.eval.protocol import compose_run_config

    class Grab(L.Callback):
        def __init__(self):
            self.params = []

        def on_train_end(self, trainer, pl_module):
            self.params.append(pl_module.target.param.detach().clone())

    grab = Grab()
    config, _ = compose_run_config(config_overrides)
    summary = run(config, run_dir, callbacks=[grab])
    return torch.cat(grab.params), summary


def test_batched_and_one_at_a_time_optimization_give_the_same_images(tmp_path, tiny_cache):
    """B captions optimized at once equal each caption optimized alone (tiny SD, SDS and SDI's inversion)."""
    for guidance in ("sds", "sdi"):
        base = ["prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "prior.device=cpu", f"guidance={guidance}",
                "prompt.texts=[a dog,a red car,a bowl of fruit]", "prompt.repeat=1", "prompt.seed_per_prompt=true",
                "trainer.max_steps=4", "trainer.checkpoint_every=0", "trainer.save_every=0", "logger=none",
                "trainer.progress_bar=false", "seed=3"]
        together, s_all = _final_latents([*base, "prompt.batch_size=3"], tmp_path / f"{guidance}_b3")
        alone, s_one = _final_latents([*base, "prompt.batch_size=1"], tmp_path / f"{guidance}_b1")
        assert s_all.get("batches") is None and s_one["batches"] == 3
        # fp32 convolutions over batch 3 vs batch 1 differ by float rounding only
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
        assert [x["key"] for x in s_one["samples"]] == ["00000", "00001", "00002"]


def test_wandb_offline_run_holds_metrics_and_media_and_no_logger_works(tmp_path):
    nerf = ["target=nerf", "trainer.max_steps=4", "trainer.save_every=2", "trainer.log_every=1",
            "target.resolutions=[16]", "target.eval_resolution=16", "target.renderer.num_samples=16",
            "target.cameras.eval_views=4", "target.mesh_resolution=0", "trainer.progress_bar=false"]
    res = run_cli([*nerf, "logger=wandb", f"hydra.run.dir={tmp_path / 'wb'}"])
    assert res.returncode == 0, res.stdout
    (folder,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    logged = read_run(folder)
    keys = {k for row in logged["history"] for k in row}
    assert {"loss", "t", "nfe", "summary/time_per_image_s", "summary/peak_memory_mb", "exact/fd"} <= keys
    steps = [row["trainer/global_step"] for row in logged["history"] if "loss" in row]
    assert steps == sorted(steps) and len(steps) >= 3
    import yaml

    saved = yaml.safe_load((tmp_path / "wb" / "config.yaml").read_text())
    assert logged["config"]["guidance"] == saved["guidance"] and logged["config"]["choices"]["target"] == "nerf"
    assert logged["run"].run_group == "sds" and "nerf" in list(logged["run"].tags)
    assert logged["run"].display_name.startswith("sds-analytic-")
    media = folder / "files" / "media"
    assert len(list(media.glob("images/images/grid_*.png"))) == 2 and list(media.glob("images/images/final_*.png"))
    (video,) = media.glob("videos/video/turntable_*.mp4")
    assert video.stat().st_size > 1000

    res = run_cli([*nerf, "logger=none", f"hydra.run.dir={tmp_path / 'none'}"])
    assert res.returncode == 0, res.stdout
    run = tmp_path / "none"
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert not (run / "wandb").exists() and not (run / "logs").exists()


def test_requeued_job_continues_in_place_skipping_finished_batches(tmp_path):
    run_dir = tmp_path / "job"
    args = ["prior=analytic", "guidance=sds", "prompt.texts=[a red circle,a blue square]", "prompt.repeat=2",
            "prompt.batch_size=1", "prompt.seed_per_prompt=true", "trainer.max_steps=12",
            "trainer.checkpoint_every=4", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    assert run_cli(args).returncode == 0
    first = json.loads((run_dir / "summary.json").read_text())
    reference = torch.load(run_dir / "batches" / "0003" / "model_samples.pt")
    # preempted during the last batch, after its step-8 checkpoint (made here by an 8-step twin of the job: SDS's
    # schedule does not depend on max_steps); the requeued job then runs the same command again
    short = tmp_path / "short"
    assert run_cli([*args[:-1], "trainer.max_steps=8", f"hydra.run.dir={short}"]).returncode == 0
    (run_dir / "batches" / "0003" / "checkpoints" / "last.ckpt").write_bytes(
        (short / "batches" / "0003" / "checkpoints" / "last.ckpt").read_bytes())
    (run_dir / "batches" / "0003" / "summary.json").unlink()
    done_before = (run_dir / "batches" / "0000" / "summary.json").stat().st_mtime_ns
    res = run_cli(args)
    assert res.returncode == 0 and "continuing the run" in res.stdout, res.stdout
    assert (run_dir / "batches" / "0000" / "summary.json").stat().st_mtime_ns == done_before  # skipped
    last = json.loads((run_dir / "batches" / "0003" / "summary.json").read_text())
    assert last["resumed_from_step"] == 8 and last["steps"] == 12
    assert torch.equal(torch.load(run_dir / "batches" / "0003" / "model_samples.pt"), reference)
    assert json.loads((run_dir / "summary.json").read_text())["exact_metrics"] == first["exact_metrics"]
    res = run_cli([*args[:-1], "trainer.max_steps=20", f"hydra.run.dir={run_dir}"])
    assert res.returncode != 0 and "already holds a run with other overrides" in res.stdout


def test_missing_coco_fails_at_start_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(["experiment=coco_fid_2d", "prior=analytic", "logger=none", f"prompt.root={tmp_path / 'nowhere'}",
                   f"hydra.run.dir={run_dir}"])
    assert res.returncode == 2
    assert f"{tmp_path / 'nowhere' / 'annotations' / 'captions_val2014.json'}" in res.stdout
    assert not run_dir.exists()
