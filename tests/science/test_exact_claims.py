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


def test_sds_at_high_cfg_collapses_compared_with_ddim(sds_and_ddim):
    """SDS at CFG 100: its 16 images collapse (little spread: all centred discs of one size) and sit far from the
    true distribution, while DDIM with the same exact eps samples it faithfully. Measured: collapse 0.49 vs 0.05,
    FD 1545 vs 943 (16 images in 3,072 unit-variance dimensions: most of DDIM's FD is the finite-sample bias that
    exact samples have too)."""
    sds, ddim = sds_and_ddim
    assert sds["collapse"] > ddim["collapse"] + 0.2
    assert sds["fd"] > 1.3 * ddim["fd"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured sharpness 0.81 for SDS at CFG 100 vs 0.79 for DDIM: SDS's red discs carry a mottled texture that the "
    "Laplacian energy counts as detail. It is not the noise of single-draw gradients under Adam: with the gradient "
    "averaged over 16 noise/t draws per step the images end sharper still (4.1); cause not isolated "
    "(experiments/exact/README.md, open in issue #12)"))
def test_sds_at_high_cfg_over_smooths(sds_and_ddim):
    sds, ddim = sds_and_ddim
    assert sds["sharpness"] < 0.5 * ddim["sharpness"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured saturation 0.50 for SDS at CFG 100 vs 1.18 for DDIM: SDS's discs are dim. The world's CFG gap on a "
    "settled component is its contrast term (a component of the prompt has contrast 1, the unconditional one "
    "0.97), so CFG w extrapolates a settled component to contrast 1 - 0.03 + 0.03 w, and DDIM at CFG 7.5 does "
    "over-saturate (experiments/exact/README.md); why SDS at w = 100 ends dim instead is not isolated (open in "
    "issue #12)"))
def test_sds_at_high_cfg_over_saturates(sds_and_ddim):
    sds, ddim = sds_and_ddim
    assert sds["saturation"] > 1.1 * ddim["saturation"]
