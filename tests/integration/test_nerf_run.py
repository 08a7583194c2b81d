"""``python run.py target=nerf`` end to end at tiny settings: files written, exact resume, every guidance, SD path."""

from __future__ import annotations

import json

import imageio.v2 as iio2
import imageio.v3 as iio
import pytest
import torch

from sdbridge.runner import run
from sdbridge.config import to_objects
from sdbridge.targets.nerf.export import read_ply
from tests.conftest import compose, run_cli
from tests.integration.test_resume import StopAt

TINY = [
    "target=nerf",
    "target.resolutions=[16]",
    "target.eval_resolution=16",
    "target.renderer.num_samples=16",
    "target.field.hidden_dim=16",
    "target.field.encoding.levels=4",
    "target.field.encoding.log2_table_size=12",
    "target.field.encoding.max_resolution=64",
    "target.field.encoding.start_level=2",
    "target.field.encoding.start_step=10",
    "target.field.encoding.update_steps=5",
    "target.cameras.eval_views=4",
    "target.mesh_resolution=32",
    "target.renderer.shading.ambient_only_steps=5",
    "target.renderer.shading.diffuse_prob=0.75",  # exercise lit / textureless shading (the demo is albedo only)
    "target.renderer.background=envmap",
    "target.renderer.random_background_prob=0.5",
    "target.regularizers.orient=[0.01]",
    "target.regularizers.sparsity=[0,1.0,0.0,20]",
    "trainer.progress_bar=false",
]


def test_nerf_cli_run_writes_grids_video_checkpoint_mesh_and_resumes(tmp_path, world_cache):
    run_dir = tmp_path / "run"
    args = [*TINY, f"hydra.run.dir={run_dir}", f"prior.cache_dir={world_cache}", "guidance=sds",
            "trainer.max_steps=30", "trainer.save_every=15", "trainer.checkpoint_every=15"]
    res = run_cli(args)
    assert res.returncode == 0, res.stdout[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["target"] == "nerf"
    assert summary["exact_metrics"]["per_prompt"].keys() == {"a red ball"}
    protocol = summary["protocol"]  # the NeRF target's own comparable fields, not a bound method's text
    assert (protocol["resolutions"], protocol["resolution_milestones"], protocol["eval_resolution"],
            protocol["eval_views"]) == ([16], [], 16, 4)
    assert "resolution" not in protocol
    for step in (15, 30):  # validation grids: rows rgb / normal / opacity of 4 views
        grid = iio.imread(run_dir / "images" / f"step_{step:06d}.png")
        assert grid.shape[0] > 2 * grid.shape[1] / 4  # 3 rows of 4 square tiles
    final = run_dir / "images" / "final"
    frames = [f for f in iio2.get_reader(final / "turntable.mp4", format="FFMPEG")]  # list() trips on len() = inf
    assert len(frames) == 4 and frames[0].shape == (16, 32, 3)  # 4 turntable frames, rgb | normal side by side
    verts, faces, colors = read_ply(final / "mesh.ply")
    assert len(verts) > 20 and faces.max() < len(verts) and colors.shape == verts.shape
    assert (final / "mesh.obj").stat().st_size > 0 and (final / "grid.png").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    metrics = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "reg/orient" in metrics and "reg/sparsity" in metrics

    res = run_cli([f"resume={run_dir}", "trainer.max_steps=40"])
    assert res.returncode == 0, res.stdout[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 30 and summary["steps"] == 40


def _config(world_cache, *extra):
    return to_objects(compose([*TINY, f"prior.cache_dir={world_cache}", "logger=none", "trainer.max_steps=12",
                               "trainer.checkpoint_every=4", "trainer.save_every=0", "target.mesh_resolution=0",
                               "guidance=sds", *extra]))


def test_killed_nerf_run_resumes_bit_identical(tmp_path, world_cache):
    full, part = tmp_path / "full", tmp_path / "part"
    run(_config(world_cache), full)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(_config(world_cache), part, callbacks=[StopAt(6, kill=True)])
    summary = run(_config(world_cache, f"resume={part}"), part)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 12
    a = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    tensors = [k for k, v in a["state_dict"].items() if isinstance(v, torch.Tensor)]
    assert any("embeddings" in k for k in tensors)
    for key in tensors:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer_states"][0]["state"].keys() == b["optimizer_states"][0]["state"].keys()
    for i, sa in a["optimizer_states"][0]["state"].items():
        assert torch.equal(sa["exp_avg"], b["optimizer_states"][0]["state"][i]["exp_avg"])


@pytest.mark.parametrize("guidance", ["sds", "nfsd", "csd", "bridge", "sdi", "ism", "vsd"])
def test_every_guidance_trains_a_nerf(tmp_path, world_cache, guidance):
    extra = ["guidance.stage_two_start_step=2"] if guidance == "bridge" else []
    summary = run(_config(world_cache, f"guidance={guidance}", "trainer.max_steps=4", *extra), tmp_path)
    assert summary["steps"] == 4 and all(v == v for v in summary["exact_metrics"]["mean"].values())


def test_nerf_on_the_latent_sd_path_with_camera_conditioned_vsd(tmp_path, tiny_cache):
    """Renders are resized to the SD prior's image size and VAE-encoded; VSD's LoRA sees the step's cameras."""
    config = to_objects(compose([*TINY, "prior=tiny_sd", f"prior.cache_dir={tiny_cache}", "prior.device=cpu",
                                 "guidance=vsd", "logger=none", "trainer.max_steps=3", "trainer.save_every=0",
                                 "target.mesh_resolution=0", "prompt.text=a dog"]))
    seen = {}
    from sdbridge.guidance.vsd import VSD

    original = VSD.camera

    def spy(self, batch_size, device):
        cam = original(self, batch_size, device)
        seen.setdefault("cameras", []).append(cam.clone())
        return cam

    VSD.camera = spy
    try:
        summary = run(config, tmp_path)
    finally:
        VSD.camera = original
    assert summary["steps"] == 3
    cams = torch.cat(seen["cameras"])
    assert cams.abs().sum() > 0 and torch.allclose(cams[:, 15], torch.ones(len(cams)))  # a real c2w, not zeros


def test_perp_neg_nerf_run_evaluates_five_conditionings(tmp_path, world_cache):
    summary = run(_config(world_cache, "trainer.max_steps=3", "target.perp_neg=true"), tmp_path)
    assert summary["steps"] == 3 and summary["nfe_per_step"] == 5  # uncond, 2 positives, 2 negatives
