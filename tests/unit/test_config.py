"""Typed configs: mistakes fail at start with a message that names the key and the allowed values."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ConfigKeyError, ValidationError

from sdbridge.config import RunConfig, to_objects
from sdbridge.guidance import BridgeConfig
from sdbridge.priors import AnalyticConfig
from sdbridge.targets import ImageTargetConfig
from tests.conftest import compose


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
    assert "scal" in str(err.value.__cause__ or err.value) or "scal" in str(err.value)


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

    from sdbridge.guidance.table import methods_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert methods_markdown() in readme, "regenerate with: python -m sdbridge.guidance.table"


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
