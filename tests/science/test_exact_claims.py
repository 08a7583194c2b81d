"""Claims of the papers checked against ground truth on the exact prior (fixed seeds, official 2D step count)."""

from __future__ import annotations

import pytest

from sdbridge.eval.protocol import ExactProtocol, reference_rows, run_method

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sds_and_ddim(analytic_prior, world_cache):
    protocol = ExactProtocol(prompts=["a red circle"], images_per_prompt=16, steps=1000, seed=0,
                             overrides=[f"prior.cache_dir={world_cache}"])
    sds = run_method("sds", protocol, ["guidance.scale=100"])["exact_metrics"]["mean"]
    ddim = reference_rows(analytic_prior, protocol)["DDIM 50 steps"]["exact_metrics"]["mean"]
    print(f"SDS@100: {sds}\nDDIM: {ddim}")
    return sds, ddim


def test_sds_at_high_cfg_over_smooths_and_collapses_compared_with_ddim(sds_and_ddim):
    """SDS at CFG 100: its 16 images collapse (little spread), lose the edges, and sit far from the true
    distribution, while DDIM with the same exact eps samples it faithfully. Measured: collapse 0.73 vs 0.06,
    sharpness 0.26 vs 0.79, FD 1532 vs 952 (16 images in 3,072 unit-variance dimensions: most of DDIM's FD is the
    finite-sample bias that exact samples have too)."""
    sds, ddim = sds_and_ddim
    assert sds["collapse"] > ddim["collapse"] + 0.2
    assert sds["sharpness"] < 0.5 * ddim["sharpness"]
    assert sds["fd"] > 1.3 * ddim["fd"]


@pytest.mark.xfail(strict=True, reason=(
    "measured saturation 0.41 for SDS at CFG 100 vs 1.18 for DDIM: SDS ends at a dim blob. Text in this world only "
    "re-weights shared components, so eps_cond - eps_uncond is ~0 once the posterior settles on one component "
    "(RMS 3e-7 at t = 500 on noised samples, experiments/exact/README.md calibration row 5); the CFG extrapolation "
    "that over-saturates SD's latents acts here only at t > 700. SD's conditional and unconditional predictions "
    "differ at every t"))
def test_sds_at_high_cfg_over_saturates(sds_and_ddim):
    sds, ddim = sds_and_ddim
    assert sds["saturation"] > 1.1 * ddim["saturation"]
