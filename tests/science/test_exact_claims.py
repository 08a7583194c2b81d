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


@pytest.fixture(scope="module")
def sds_from_zeros(world_cache):
    """SDS at CFG 100 from a zero init ("zeros also works": the Bridge paper's 2D code, generate.py, whose default is
    randn), the same protocol otherwise."""
    protocol = ExactProtocol(prompts=["a red circle"], images_per_prompt=16, steps=1000, seed=0,
                             overrides=[f"prior.cache_dir={world_cache}"])
    sds = run_method("sds", protocol, ["guidance.scale=100", "target.init_scale=0"])["exact_metrics"]["mean"]
    print(f"SDS@100 from zeros: {sds}")
    return sds


def test_sds_at_high_cfg_over_smooths_from_a_zero_init(sds_from_zeros, sds_and_ddim):
    """From a zero init there is no init texture to carry along (see the randn xfail below): SDS at CFG 100 ends at
    soft, centred, alike red discs. Measured: sharpness 0.13 vs DDIM's 0.79, collapse 0.85 (2026-12-04)."""
    _, ddim = sds_and_ddim
    assert sds_from_zeros["sharpness"] < 0.5 * ddim["sharpness"]
    assert sds_from_zeros["collapse"] > ddim["collapse"] + 0.2


def test_sds_at_high_cfg_collapses_compared_with_ddim(sds_and_ddim):
    """SDS at CFG 100: its 16 images collapse (little spread: all centred discs of one size) and sit far from the
    true distribution, while DDIM with the same exact eps samples it faithfully. Measured: collapse 0.49 vs 0.05,
    FD 1545 vs 943 (16 images in 3,072 unit-variance dimensions: most of DDIM's FD is the finite-sample bias that
    exact samples have too)."""
    sds, ddim = sds_and_ddim
    assert sds["collapse"] > ddim["collapse"] + 0.2
    assert sds["fd"] > 1.3 * ddim["fd"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured sharpness 0.81 for SDS at CFG 100 vs 0.79 for DDIM: from randn SDS's discs keep the init's pixel "
    "texture for ~1,000 steps. Measured: from exact samples (target.init=samples) SDS wipes the sensor noise "
    "(sharpness 0.70 at CFG 40, a passing check in test_method_claims.py; 1.07 at CFG 100, where the over-bright "
    "edges and their dark halos add Laplacian energy back), and at CFG 7.5 the texture is gone by step 500; on a sample plus texture the "
    "expected gradient restores the texture at 0.13-0.46 x its amplitude, but on SDS's own final images it adds "
    "texture at t = 500 (k = -0.20) and varies 4-10 RMS across noise draws at t = 300-700 (0.03-0.2 on samples: the "
    "exact posterior switches between disc and ring with the draw; experiments/exact/gradient_noise.py), and 8 draws "
    "per step, 3x the learning rate or an init at the data's per-pixel scale all keep the texture. Whether SD's eps "
    "switches as sharply is not measured. From a zero init (no texture) it does over-smooth: sharpness 0.13, the test "
    "above. In a world with contrast variation and a heavier text weight (prior.contrast_std=0.35 "
    "text_adherence=0.99) 14 of 16 SDS images from randn are smooth, alike discs and squares (sharpness 0.21-0.39; "
    "the default's 10% off-prompt mass lets an off-prompt white ring capture both posteriors at t <= 400) "
    "(experiments/exact/README.md, open in issue #12)"))
def test_sds_at_high_cfg_over_smooths(sds_and_ddim):
    sds, ddim = sds_and_ddim
    assert sds["sharpness"] < 0.5 * ddim["sharpness"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured saturation 0.50 for SDS at CFG 100 vs 1.18 for DDIM within 1,000 steps from randn: the init's texture "
    "(above) keeps the discs mottled and dim. From exact samples (target.init=samples) SDS does over-saturate: "
    "saturation 3.66 at CFG 100 and 2.97 at CFG 40 after 1,000 steps (the latter a passing check in "
    "test_method_claims.py), contrast 1.00 -> 1.36 in 400 steps, linearly; from randn the chroma keeps rising past "
    "the data's (0.20 at 1,000 steps, 0.24 at 4,000, data 0.22), so what is slow is forming the shape from randn, "
    "not the CFG push: a text contrast that hides it (prior.text_contrast=0.5 with contrast variation: SDS "
    "saturation 1.12 at 1,000 steps) makes DDIM at CFG 7.5 3x too saturated (3.05); from a zero init the discs are as dim "
    "(saturation 0.47 at CFG 100, 2026-12-04); with contrast variation (prior.contrast_std=0.35) SDS at CFG 40 reaches "
    "the data's brightest red by 1,000 steps (0.88 vs 0.89) and passes it at 2,000 (1.49), the disc's mean still dim "
    "(experiments/exact/README.md, open in issue #12). With a network trained on this world as the prior (16 px, "
    "test_learned_prior_claims.py, 2026-12-05) SDS from randn over-saturates: 2.1 at CFG 40, 3.8 at CFG 100 (the "
    "closed form at 16 px: 0.79, 1.04)"))
def test_sds_at_high_cfg_over_saturates(sds_and_ddim):
    sds, ddim = sds_and_ddim
    assert sds["saturation"] > 1.1 * ddim["saturation"]
