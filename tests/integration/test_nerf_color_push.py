"""experiments/exact/nerf_color_push.py: the CFG push on the NeRF science check's initial gray renders."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("nerf_color_push", ROOT / "experiments" / "exact" /
                                                  "nerf_color_push.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shape_pull_adds_a_colorless_push_on_a_gray_blob(world_cache, capsys):
    """Measured property the NeRF color xfail rests on: at t = 300 the posterior has settled, so without the shape
    pull the prompt changes nothing there, and with it the push is the same in R, G and B (a gray brightening)."""
    module = _module()
    pulled = module.color_push([f"prior.cache_dir={world_cache}"], [300, 950], draws=2)
    plain = module.color_push([f"prior.cache_dir={world_cache}", "prior.text_pull=0"], [300, 950], draws=2)
    r, g, b = pulled["initial"]
    assert abs(r - g) < 0.05 and abs(g - b) < 0.05  # the initial blob is gray
    push = pulled["push"][300]
    assert min(push) > 0.05 and max(push) - min(push) < 0.01 * max(push), push
    assert max(abs(v) for v in plain["push"][300]) < 1e-3, plain["push"][300]
    for out in (pulled, plain):  # at t = 950 the prompt acts: x0(cond) is redder than x0(uncond)
        cond, uncond = out["x0"]["cond"], out["x0"]["uncond"]
        assert out["x0"]["t"] == 950 and cond[0] - uncond[0] > 0.05
    assert module.main(["--t", "300", "--draws", "1", f"prior.cache_dir={world_cache}"]) == 0
    assert "t =  300: CFG push" in capsys.readouterr().out
