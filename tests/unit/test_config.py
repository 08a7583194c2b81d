"""Typed configs: mistakes fail at start with a message that names the key and the allowed values."""

from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ConfigKeyError, ValidationError

from sdbridge.config import RunConfig, to_objects
from sdbridge.guidance import BridgeConfig
from sdbridge.priors import AnalyticConfig
from sdbridge.targets import ImageTargetConfig
from tests.conftest import CONF, compose


def test_default_config_composes_to_typed_objects():
    cfg = to_objects(compose())
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.guidance, BridgeConfig) and cfg.guidance.scale == 40.0
    assert isinstance(cfg.prior, AnalyticConfig)
    assert isinstance(cfg.target, ImageTargetConfig) and cfg.target.optimizer.lr == 0.01
    assert cfg.target.optimizer.eps == 1e-15 and list(cfg.target.optimizer.betas) == [0.9, 0.99]
    assert cfg.trainer.max_steps == 1000


def test_misspelt_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["guidance=sds", "guidance.scal=3"])
    cause = str(err.value.__cause__)  # the message names the key and the config it is not part of
    assert "Key 'scal' not in 'SDSConfig'" in cause and "full_key: guidance.scal" in cause


def test_misspelt_top_level_key():
    with pytest.raises(ConfigCompositionException, match="seeed"):
        compose(["seeed=3"])


def test_unknown_group_option_lists_available_options():
    with pytest.raises(HydraException) as err:
        compose(["guidance=nope"])
    assert "Available options" in str(err.value) and "sds" in str(err.value)


def test_bad_enum_value_lists_allowed_values():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["guidance=sds", "guidance.weighting=foo"])
    text = f"{err.value} {err.value.__cause__}"
    assert "one_minus_abar" in text and "sigma" in text


def test_wrong_type_is_refused():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose(["trainer.max_steps=many"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("target.optimizer.lr=-1", "target.optimizer.lr"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("prompt.repeat=0", "prompt.repeat"),
        ("scheduler.min_step_ratio=0.99", "min_step_ratio"),
        ("target.init=image", "target.init_image"),
    ],
)
def test_range_checks_run_before_anything_is_built(override, message):
    cfg = compose([override])
    with pytest.raises(ValueError, match=message):
        to_objects(cfg)


def test_readme_method_table_is_generated_from_the_code():
    from pathlib import Path

    from sdbridge.eval.method_table import methods_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert methods_markdown() in readme, "regenerate with: python -m sdbridge.eval.method_table"


def test_every_guidance_yaml_composes_with_its_schedule():
    from sdbridge.config import to_objects

    cfg = to_objects(compose(["guidance=sdi"]))
    assert type(cfg.scheduler).__name__ == "AnnealConfig" and cfg.scheduler.min_step_ratio == 0.02
    cfg = to_objects(compose(["guidance=sdi_cached"]))
    assert cfg.target.optimizer.lr == 0.1 and cfg.target.optimizer.weight_decay == 0.0
    assert cfg.scheduler.min_step_ratio == 0.02 and cfg.target.init.name == "denoised"
    cfg = to_objects(compose(["guidance=sdi", "scheduler=uniform"]))  # the command line wins
    assert type(cfg.scheduler).__name__ == "UniformConfig"
    cfg = to_objects(compose(["experiment=painting2real"]))
    assert cfg.guidance.stage_two_start_step == 0 and cfg.guidance.source_modifier == ", painting"
    assert cfg.target.init.name == "image"


def test_nerf_presets_compose_with_the_official_3d_settings():
    from sdbridge.config import to_objects

    cfg = to_objects(compose(["target=nerf"]))  # the CPU demo: exact prior, one prompt, small field
    assert type(cfg.target).__name__ == "NeRFTargetConfig" and type(cfg.prior).__name__ == "AnalyticConfig"
    assert cfg.prompt.texts == ["a red ball"] and cfg.prompt.repeat == 1 and cfg.target.resolutions == [32]
    sdi = to_objects(compose(["experiment=nerf_sdi"]))
    assert type(sdi.prior).__name__ == "StableDiffusionConfig" and "2-1-base" in sdi.prior.model
    assert sdi.trainer.max_steps == 10000 and sdi.target.resolutions == [512] and sdi.target.renderer.num_samples == 512
    assert sdi.scheduler.min_step_ratio == 0.25 and sdi.guidance.inversion_scale == -7.5
    enc = sdi.target.field.encoding
    assert (enc.levels, enc.log2_table_size, enc.max_resolution, enc.start_level, enc.start_step) == (16, 19, 4096, 8, 2000)
    assert sdi.target.regularizers.sparsity == [0, 0.15, 0.0, 3000]
    bridge = to_objects(compose(["experiment=nerf_bridge"]))
    assert bridge.guidance.scale == 100 and bridge.guidance.stage_two_start_step == 20000
    assert bridge.target.resolutions == [64, 512] and bridge.target.resolution_milestones == [5000]
    assert bridge.target.resolution(4999) == 64 and bridge.target.resolution(5000) == 512
    assert bridge.scheduler.switch_steps == [5001] and bridge.scheduler.max_ratios == [0.5]  # [5000, 0.98, 0.5, 5001]
    assert bridge.target.optimizer.weight_decay == 0.01 and bridge.target.cameras.eval_distance == 1.5
    assert bridge.target.regularizers.weights(10001)["opaque"] == 1000
    sds = to_objects(compose(["experiment=nerf_sds"]))
    assert type(sds.guidance).__name__ == "SDSConfig" and sds.guidance.scale == 100
    assert sds.target == bridge.target and sds.scheduler == bridge.scheduler  # only the guidance differs
    vsd = to_objects(compose(["experiment=nerf_vsd"]))
    assert type(vsd.guidance).__name__ == "VSDConfig" and vsd.target == bridge.target
    assert type(vsd.scheduler).__name__ == "StagedConfig"


def test_bad_nerf_values_name_the_key():
    from sdbridge.config import to_objects

    for override, key in [("target.resolution_milestones=[100]", "target.resolutions"),
                          ("target.cameras.fovy_range=[70,40]", "target.cameras.fovy_range"),
                          ("target.regularizers.sparsity=[1,2]", "target.regularizers.sparsity"),
                          ("target.field.encoding.start_level=99", "start_level")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            to_objects(compose(["target=nerf", override]))
    with pytest.raises(Exception, match="background"):
        compose(["target=nerf", "target.renderer.background=sky"])


def test_slurm_and_local_launchers_compose_from_the_environment(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("SDB_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("SDB_GPUS_PER_NODE", "2")
    monkeypatch.setenv("SDB_ARRAY_PARALLELISM", "16")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
        local = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and local._target_.endswith("LocalLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.array_parallelism) == ("gpu-long", 2, 16)
    assert slurm.max_num_timeout >= 1 and slurm.signal_delay_s > 0  # requeue on preemption / time-out
    assert local.gpus_per_node == 2 and local.tasks_per_node == 1  # SDB_GPUS_PER_NODE serves both


def test_a_run_directory_is_continued_only_by_the_same_run(tmp_path):
    """Relaunching into a run directory (a requeued job) continues it only with the same overrides and config."""
    from omegaconf import OmegaConf

    from sdbridge.cli import continues_in_place

    overrides = ["guidance=sds", "trainer.max_steps=12"]
    cfg = compose(overrides)
    assert not continues_in_place(tmp_path, overrides, cfg)  # nothing there yet
    OmegaConf.save(OmegaConf.create(overrides), tmp_path / "overrides.yaml")
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert continues_in_place(tmp_path, list(reversed(overrides)), cfg)
    with pytest.raises(ValueError, match="other overrides"):
        continues_in_place(tmp_path, ["guidance=sds", "trainer.max_steps=20"], compose(["guidance=sds"]))
    changed = compose(overrides)
    changed.guidance.scale = 7.0  # e.g. the YAML defaults changed since the run started
    with pytest.raises(ValueError, match=r"another config \(differs in \['guidance.scale'\]"):
        continues_in_place(tmp_path, overrides, changed)


# ------------------------------------------------------------------ one registry, YAMLs hold only differences
def test_one_registry_names_every_option_and_the_class_it_builds():
    """Every conf/<group>/<name>.yaml is a registered option; each registered config names the class it builds."""
    from sdbridge import registry
    from sdbridge.config import SCHEMAS

    assert SCHEMAS == registry.groups()
    for group in ("guidance", "prior", "scheduler", "target"):
        for name, config_cls in SCHEMAS[group].items():
            assert "builds" in vars(config_cls), f"{group}/{name}: {config_cls.__name__} names no class"
    for yaml in CONF.glob("*/*.yaml"):
        group = yaml.parent.name
        refs = re.findall(r"/schema/(\w+)/(\w+)@", yaml.read_text())
        for ref_group, option in refs:
            assert option in SCHEMAS[ref_group], f"{yaml}: schema/{ref_group}/{option} is not registered"
    with pytest.raises(ValueError, match="registered twice"):
        registry.option("guidance", "sds")(type("Other", (), {}))
    with pytest.raises(ValueError, match="no class is registered for config type TrainerConfig"):
        registry.build(SCHEMAS["trainer"]["trainer"]())


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def test_group_yamls_hold_only_what_differs_from_the_dataclass():
    """A value written in conf/<group>/<name>.yaml under its schema differs from the dataclass default (the default is
    written once, in the dataclass)."""
    from omegaconf import OmegaConf

    from sdbridge.config import SCHEMAS

    repeated = []
    for group in ("guidance", "prior", "scheduler", "target", "prompt", "trainer", "logger", "eval"):
        for yaml in sorted((CONF / group).glob("*.yaml")):
            found = re.search(rf"/schema/{group}/(\w+)@(\S+)", yaml.read_text())
            if not found:
                continue
            defaults = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[group][found.group(1)]), enum_to_str=True)
            data = OmegaConf.to_container(OmegaConf.load(yaml))
            data = data if found.group(2) == "_here_" else data.get(found.group(2).split(".")[-1], {})
            for path, value in _leaves({k: v for k, v in data.items() if k != "defaults"}):
                default = defaults
                for key in path:
                    default = default.get(key, KeyError) if isinstance(default, dict) else KeyError
                if default is not KeyError and (value == default or (isinstance(value, (int, float))
                                                                     and isinstance(default, (int, float))
                                                                     and float(value) == float(default))):
                    repeated.append(f"{yaml.relative_to(CONF)}: {'.'.join(path)}: {value!r}")
    assert not repeated, "defaults written twice (delete them from the YAML):\n" + "\n".join(repeated)
