"""Bad input is one line, not a traceback: ``sdbridge: error: ...`` naming the option or file and a fix, exit 2,
refused before anything is written (no run directory left behind); damaged caches are found by their checksums and
rebuilt to the same bytes with a one-line warning (issue #15)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

#: fast to refuse: the exact prior at 16 px (the refusals below happen before it would be built)
BASE = ["prior=analytic", "prior.size=16", "trainer.max_steps=2", "trainer.progress_bar=false", "logger=none"]


def _cli(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """``python run.py <args>`` with stdout and stderr apart (``tests.conftest.run_cli`` merges them)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=timeout, env=env)


def _assert_one_line_error(res: subprocess.CompletedProcess, run_dir: Path, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, ``sdbridge: error: ...`` holding every needle, no run directory."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("sdbridge: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stdout + res.stderr
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    return lines[0]


# ------------------------------------------------------------------------------------------------ devices
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("prior.device=tpu", ["prior.device='tpu'", "not a device torch knows", "auto, cpu"]),
        pytest.param("prior.device=cuda", ["prior.device='cuda'", "CUDA is not available", "prior.device=cpu"],
                     marks=NO_CUDA),
        pytest.param("trainer.accelerator=gpu", ["trainer.accelerator='gpu'", "CUDA is not available",
                                                 "trainer.accelerator=auto"], marks=NO_CUDA),
        pytest.param("trainer.accelerator=cuda", ["trainer.accelerator='cuda'", "CUDA is not available"],
                     marks=NO_CUDA),
        ("trainer.accelerator=tpu", ["trainer.accelerator='tpu'", "'auto', 'cpu', 'gpu', 'cuda', 'mps'"]),
    ],
)
def test_a_device_this_machine_cannot_use_is_refused_before_anything_runs(override, needles):
    """The checks the CLI runs before it writes anything (``runner.check_run`` or the typed config), in-process."""
    from sdbridge.config import to_objects
    from sdbridge.runner import check_run
    from tests.conftest import compose

    with pytest.raises(Exception) as err:
        check_run(to_objects(compose([*BASE, override])))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_samples_init_on_a_prior_without_a_true_distribution_is_refused_before_anything_is_built():
    """``target.init=samples`` on Stable Diffusion: refused by ``check_run`` (what the CLI calls before it writes
    anything), naming the option and the inits that work; the exact prior accepts it."""
    from sdbridge.config import to_objects
    from sdbridge.runner import check_run
    from tests.conftest import compose

    with pytest.raises(ValueError) as err:
        check_run(to_objects(compose(["prior=tiny_sd", "target.init=samples", "logger=none"])))
    for needle in ["target.init=samples", "true distribution", "prior=analytic", "randn, zeros, image or denoised"]:
        assert needle in str(err.value), str(err.value)
    check_run(to_objects(compose([*BASE, "target.init=samples"])))


@pytest.mark.parametrize("override, needles", [
    ("prior.device=tpu", ["prior.device='tpu'", "not a device torch knows", "auto, cpu"]),
    pytest.param("trainer.accelerator=gpu", ["trainer.accelerator='gpu'", "CUDA is not available"],
                 marks=[NO_CUDA, pytest.mark.slow]),
])
def test_a_device_this_machine_cannot_use_is_one_line(tmp_path, override, needles):
    run_dir = tmp_path / "run"
    _assert_one_line_error(_cli([f"hydra.run.dir={run_dir}", *BASE, override]), run_dir, *needles)


def test_device_checks_accept_what_is_here_and_refuse_the_rest():
    from sdbridge.config import TrainerConfig
    from sdbridge.priors.base import available_devices, resolve_device
    from sdbridge.config import to_objects
    from sdbridge.runner import check_devices
    from tests.conftest import compose

    for device in available_devices():
        resolve_device(device)
    for device, needle in (("cuda:x", "not a device torch knows"), ("meta", "sdbridge runs on cpu, cuda or mps"),
                           ("cuda:99", "CUDA")):
        with pytest.raises(ValueError, match=needle) as err:
            resolve_device(device)
        assert f"prior.device={device!r}" in str(err.value) and "auto, cpu" in str(err.value)
    check_devices(to_objects(compose(["prior.device=cpu", "trainer.accelerator=cpu"])))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="share one device"):
            check_devices(to_objects(compose(["prior.device=cuda", "trainer.accelerator=cpu"])))
    with pytest.raises(ValueError, match="trainer.accelerator='xla'"):
        TrainerConfig(accelerator="xla")


# ------------------------------------------------------------------------------------------------ prompt file
def test_a_binary_prompt_file_names_the_file_and_the_option(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80 a red circle\n")
    run_dir = tmp_path / "run"
    _assert_one_line_error(_cli([f"hydra.run.dir={run_dir}", *BASE, f"prompt.file={prompts}"]), run_dir,
                           "prompt.file=", str(prompts), "not UTF-8", "save it as UTF-8")


# ------------------------------------------------------------------------------------------------ resume elsewhere
def test_resume_into_another_run_directory_is_refused(tmp_path):
    resumed = tmp_path / "X"
    resumed.mkdir()
    (resumed / "summary.json").write_text("{}")
    other = tmp_path / "Y"
    res = _cli([f"resume={resumed}", f"hydra.run.dir={other}", "trainer.progress_bar=false"])
    _assert_one_line_error(res, other, f"resume={resumed} continues {resumed} in place", "drop hydra.run.dir",
                           f"set it to {resumed}")
    assert sorted(p.name for p in resumed.iterdir()) == ["summary.json"]


# ------------------------------------------------------------------------------------------------ user weights
@pytest.fixture
def user_model(tmp_path, tiny_cache) -> Path:
    """A local diffusers folder (the tiny SD's files) as a user would pass with prior.model=<folder>."""
    from sdbridge.priors.tiny import TinySDConfig, ensure_tiny_sd

    folder = tmp_path / "my-sd"
    shutil.copytree(ensure_tiny_sd(TinySDConfig(cache_dir=str(tiny_cache))), folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", pytest.param("empty", marks=pytest.mark.slow)])
def test_truncated_or_empty_unet_weights_name_the_file(tmp_path, user_model, damage):
    weights = user_model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"")
    run_dir = tmp_path / "run"
    res = _cli([f"hydra.run.dir={run_dir}", "prior=sd21_base", f"prior.model={user_model}", "prior.device=cpu",
                "trainer.max_steps=2", "trainer.progress_bar=false", "logger=none"])
    _assert_one_line_error(res, run_dir, "prior.model", str(weights), damage, "download it again")


def test_the_weights_check_passes_a_complete_folder_and_the_loader_names_a_garbled_one(user_model):
    from sdbridge.priors.stable_diffusion import (PriorUnavailableError, StableDiffusionConfig, StableDiffusionPrior,
                                                  check_local_weights)

    config = StableDiffusionConfig(model=str(user_model), device="cpu")
    check_local_weights(config)  # complete: no error
    weights = user_model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00" * 32  # the JSON header garbled, the length unchanged
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        check_local_weights(config)
    with pytest.raises(PriorUnavailableError, match="cannot be loaded") as err:
        StableDiffusionPrior(config)  # a damaged file that reaches the loader (e.g. in the hub cache)
    assert "\n" not in str(err.value) and str(user_model) in str(err.value)


# ------------------------------------------------------------------------------------------------ caches
SMALL_WORLD = dict(size=16, clusters=4, rank=4, coarse_clusters=2, coarse_rank=3, renders_per_cluster=24)


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
def test_a_damaged_world_cache_is_rebuilt_to_the_same_numbers(tmp_path, caplog, damage):
    from sdbridge.priors.world import WorldSpec, load_world

    spec = WorldSpec(**SMALL_WORLD)
    original = load_world(spec, tmp_path)
    path = tmp_path / f"world-{spec.key()}.pt"
    good = path.read_bytes()
    assert (tmp_path / f"{path.name}.sha256.json").is_file()
    damage(path)
    with caplog.at_level(logging.WARNING, logger="sdbridge"):
        rebuilt = load_world(spec, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "exact-world cache" in warnings[0] and str(path) in warnings[0] and "rebuilding" in warnings[0]
    for model in ("fine", "coarse"):
        for name, t in getattr(original, model).tensors().items():
            assert torch.equal(getattr(rebuilt, model).tensors()[name], t), (model, name)
    assert path.read_bytes() == good
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdbridge"):
        load_world(spec, tmp_path)  # the rebuilt file verifies: no warning
    assert not caplog.records


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbled"])
def test_a_damaged_tiny_sd_cache_is_rebuilt_to_the_same_bytes(tmp_path, tiny_cache, caplog, damage):
    from sdbridge.priors.tiny import TinySDConfig, ensure_tiny_sd, verify_tiny_sd

    source = ensure_tiny_sd(TinySDConfig(cache_dir=str(tiny_cache)))
    shutil.copytree(source, tmp_path / source.name)
    config = TinySDConfig(cache_dir=str(tmp_path))
    folder = ensure_tiny_sd(config)
    assert folder == tmp_path / source.name and verify_tiny_sd(folder) is None
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    damage(weights)
    assert "unet/diffusion_pytorch_model.safetensors" in verify_tiny_sd(folder)
    with caplog.at_level(logging.WARNING, logger="sdbridge"):
        assert ensure_tiny_sd(config) == folder
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "tiny-SD cache" in warnings[0] and str(folder) in warnings[0] and "rebuilding" in warnings[0]
    assert weights.read_bytes() == good
    manifest = lambda f: json.loads((f / "sdbridge_tiny.json").read_text())["files"]  # noqa: E731
    assert manifest(folder) == manifest(source)  # every file rebuilt to the original bytes
    assert verify_tiny_sd(folder) is None


# ------------------------------------------------------------------------------------------------ tables
def _make_table():
    spec = importlib.util.spec_from_file_location("coco_make_table", ROOT / "experiments" / "coco_fid" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _summary(run_dir: Path, method: str, shard: int) -> None:
    run_dir.mkdir(parents=True)
    summary = {"guidance": method, "run_dir": str(run_dir), "protocol": {"prior": "tiny_sd", "steps": 2},
               "prompt_set": {"shard": shard, "num_shards": 2},
               "samples": [{"key": f"{shard}", "prompt": "a dog"}], "wall_clock_s": 2.0, "steps": 2,
               "nfe_total": 4, "num_images": 1, "peak_memory_mb": 100.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep_with_a_truncated_summary(tmp_path) -> tuple[Path, Path]:
    sweep = tmp_path / "sweep"
    for i, (method, shard) in enumerate([("sds", 0), ("sds", 1), ("csd", 0), ("csd", 1)]):
        _summary(sweep / f"{i}_{method}_{shard}", method, shard)
    bad = sweep / "1_sds_1" / "summary.json"
    bad.write_text(bad.read_text()[:50])
    return sweep, bad


def test_make_table_leaves_out_a_truncated_summary_and_says_so(sweep_with_a_truncated_summary, capsys):
    sweep, bad = sweep_with_a_truncated_summary
    assert _make_table()([str(sweep), "--fid", "none", "--clip-fid", "none"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [ln for ln in err if str(bad) in ln]
    assert len(warned) == 1 and warned[0].startswith("make_table: warning: left out of the table:"), err
    rows = {r["method"]: r for r in json.loads((sweep / "table.json").read_text())["rows"]}
    assert rows["sds"]["shards"] == "1/2" and rows["sds"]["missing_shards"] == [1] and rows["csd"]["shards"] == "2/2"
    table = (sweep / "table.md").read_text()
    assert "(incomplete)" in table and "Left out: 1 unreadable summary.json" in table and str(bad) in table


def test_make_table_strict_stops_at_a_truncated_summary_with_one_line(sweep_with_a_truncated_summary, capsys):
    sweep, bad = sweep_with_a_truncated_summary
    assert _make_table()([str(sweep), "--fid", "none", "--clip-fid", "none", "--strict"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("make_table: error: ") and str(bad) in err[0], err
    assert not (sweep / "table.md").exists()


def test_make_table_with_only_unreadable_summaries_is_one_line(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    (sweep / "0_sds").mkdir(parents=True)
    (sweep / "0_sds" / "summary.json").write_bytes(b"\xff\xfe{")
    assert _make_table()([str(sweep), "--fid", "none", "--clip-fid", "none"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and str(sweep / "0_sds" / "summary.json") in err[0], err


# ------------------------------------------------------------------------------------------------ non-finite hint
def test_the_non_finite_gradient_hint_names_dtype_scale_and_learning_rate(stub_prior):
    from sdbridge.guidance import SDS, NonFiniteGradientError, SDSConfig
    from sdbridge.schedules import UniformConfig, build_schedule

    guidance = SDS(SDSConfig(), stub_prior, build_schedule(UniformConfig()), torch.Generator().manual_seed(0))
    x0 = torch.zeros(2, 3, 4, 4)
    x0[1, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError) as err:
        guidance(x0, ["a dog", "a cat"], step=7)
    message = str(err.value)
    assert "\n" not in message and "step 7" in message
    for option in ("dtype", "guidance.scale", "target.optimizer.lr"):
        assert option in message, message
