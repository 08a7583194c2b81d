"""The papers' claims about the methods, checked against ground truth on the exact prior (fixed seeds, 1000 steps).

One protocol for all claims: prompt "a red circle", 16 images from the common N(0, 1) init (or, where a test says
so, from exact samples: what a method does to images that already are the truth), each method with its
conf/guidance defaults (the official 2D settings), scored by exact metrics. A claim the exact prior does not
reproduce is marked ``xfail(strict=True)`` with the measured numbers and the measured world property that explains
it (experiments/exact/README.md): it is reported, not tuned away, and CI notices if it starts to hold.
"""

from __future__ import annotations

import math

import pytest

from sdbridge.eval.protocol import ExactProtocol, reference_rows, run_method

pytestmark = pytest.mark.slow

PROTOCOL = dict(prompts=["a red circle"], images_per_prompt=16, steps=1000, seed=0)


@pytest.fixture(scope="module")
def metrics(analytic_prior, world_cache):
    protocol = ExactProtocol(**PROTOCOL, overrides=[f"prior.cache_dir={world_cache}"])
    cache: dict[tuple, dict] = {}

    def get(name: str, *extra: str) -> dict:
        key = (name, *extra)
        if key not in cache:
            if name == "true":  # exact samples of the prompt
                row = reference_rows(analytic_prior, protocol, scales=())["true samples"]
            elif name.startswith("ddim"):  # "ddim" (CFG 1) or "ddim@<scale>"
                scale = float(name.partition("@")[2] or 1)
                rows = reference_rows(analytic_prior, protocol, scales=(scale,))
                row = next(v for k, v in rows.items() if k.startswith("DDIM"))
            else:
                row = run_method(name, protocol, extra)
            cache[key] = row["exact_metrics"]["mean"]
            print(f"{key}: " + ", ".join(f"{k} {v:.3g}" for k, v in cache[key].items()))
        return cache[key]

    return get


def fd(metrics, name, *extra):
    return metrics(name, *extra)["fd"]


def test_sdi_cached_is_almost_ddim_at_the_same_cfg(metrics):
    """The SDI paper's 2D claim: with the previous prediction as kappa (and the notebook's start: x0 = x0_hat of x_T,
    first kappa = that eps), SDS becomes DDIM. At CFG 1, the exact DDIM reference's. Measured: FD 787 against 943 for
    DDIM and 1610 for SDS (red discs, one red square: the prompt's 10% off-concept mass, as the true samples)."""
    ours = fd(metrics, "sdi_cached", "guidance.scale=1", "target.init_cfg=1")
    assert ours < 1.5 * fd(metrics, "ddim")
    assert ours < 0.75 * fd(metrics, "sds")


def test_sdi_cached_at_official_settings_is_almost_ddim_at_that_cfg(metrics):
    """The notebook's settings (CFG 7.5 in threestudio's convention = 8.5 here) against DDIM at CFG 8.5. Measured:
    FD 1787 against 1609, both collapse 0.0, saturation 1.99 against 1.87 (bright red discs)."""
    ours, ddim = metrics("sdi_cached"), metrics("ddim@8.5")
    assert ours["fd"] < 1.5 * ddim["fd"]
    assert ours["collapse"] < ddim["collapse"] + 0.1
    assert ours["saturation"] > 0.8 * ddim["saturation"]


@pytest.mark.timeout(3600)
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured with threestudio's defaults (issue #13): FD 3532 for SDI vs 1610 for SDS; gray multicolored rings "
    "(saturation 0.03, adherence 0). Not the code (gradient = threestudio's to 1.4e-5; sdi_cached ~ DDIM holds), the "
    "world: on exact samples SDI's targets are right (x0_hat - x0 RMS 0.2-0.6 for t = 100..700), but from the N(0, I) "
    "init the exact eps of an image off the data is 2.7x its noise at t = 50 (data: 0.75; a trained network's stays "
    "O(1)); the 10-step inversion accumulates it (kappa RMS 3.4 at t = 980, 3.2 with a CFG-1 inversion), so targets "
    "reach RMS 5-11 (data 1.0) and decode to clipped shapes. With each inversion eps rescaled to unit RMS the targets "
    "stay at RMS 0.6-1.1 and are red shapes, yet they change shape and place from step to step, and the images end "
    "as superposed red rings (experiments/exact/README.md, open in issue #12). With a network trained on this world as "
    "the prior (16 px, test_learned_prior_claims.py) SDI beat SDS from randn with the first network (2026-12-05: FD "
    "1124 vs 1309; the closed form at 16 px: 612 vs 487) and fails with the shipped one (2026-12-06: 1490 vs 1300, "
    "a strict xfail there: the network's CFG difference under the -6.5 inversion, measured; with a CFG 1 inversion "
    "SDI wins there, 671 vs 1300)"))
def test_sdi_beats_sds(metrics):
    assert fd(metrics, "sdi") < fd(metrics, "sds")


FROM_TRUTH = "target.init=samples"  # every image starts at an exact sample of its prompt


def test_sds_over_saturates_and_over_smooths_the_truth(metrics):
    """Both papers' diagnosis of SDS at high CFG, on images that already are the truth: 1000 steps of SDS at its
    official 2D scale (40) brighten exact samples past the data (the CFG update's parallel part) and wipe their
    sensor noise (mode seeking). Measured (2026-12-04): saturation 2.97 against the samples' 1.13, sharpness 0.70
    against 0.98 (experiments/exact/README.md: "From the truth")."""
    sds, true = metrics("sds", FROM_TRUTH), metrics("true")
    assert sds["saturation"] > 1.5 * true["saturation"]
    assert sds["sharpness"] < 0.8 * true["sharpness"]


def test_bridge_second_stage_undoes_what_sds_does_to_the_truth(metrics):
    """The Bridge paper's mechanism: stage 2 points from the current distribution ("oversaturated, smooth, ...") to
    the target, so from exact samples Bridge ends nearer the truth than SDS alone in every respect SDS spoils.
    Measured (2026-12-04): FD 1620 against 3340, NLL 7.2 against 16.7 bits/dim, saturation 1.18 against 2.97 and
    sharpness 1.29 against 0.70 (the samples: 1.13, 0.98). The classifier names every Bridge image a red circle;
    adherence is not part of this claim (the classifier's first rule put their thin dark halos beyond what 99% of exact
    samples reach)."""
    bridge, sds, true = metrics("bridge", FROM_TRUTH), metrics("sds", FROM_TRUTH), metrics("true")
    assert bridge["fd"] < 0.8 * sds["fd"]
    assert bridge["nll_bpd"] < sds["nll_bpd"]
    for key in ("saturation", "sharpness"):  # nearer the truth's value, on a log scale
        assert abs(math.log(bridge[key] / true[key])) < abs(math.log(sds[key] / true[key])), key


def test_sdi_and_vsd_keep_the_truth_better_than_sds(metrics):
    """The SDI and VSD papers' claim (better than SDS) where this world reaches it: from exact samples both end nearer
    the truth than SDS at its official scale, which over-saturates it (from randn both fail: the strict xfails).
    Measured (2026-12-04): see the from-truth table of experiments/exact/README.md and the printed metrics."""
    sds = fd(metrics, "sds", FROM_TRUTH)
    assert fd(metrics, "sdi", FROM_TRUTH) < 0.8 * sds
    assert fd(metrics, "vsd", FROM_TRUTH) < 0.8 * sds


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured: FD 2515 for Bridge vs 1610 for SDS, adherence 0; stage 1 (SDS) ends at mottled red discs, stage 2 "
    "turns them into red rings. Measured cause: the source words 'smooth' and 'blurry' make the bridge direction a "
    "sharpening one that does not vanish on sharp images at t >= 600 (40 RMS(eps_tgt - eps_src) = 0.59 at t = 600 on "
    "exact samples, 0 for t <= 400), so 500 steps at scale 40 overshoot into an unsharp mask's rings: source ', "
    "noisy' alone gives discs without rings (2043), ', smooth' alone rings (2545); corrupted copies from the fine "
    "geometry change nothing (2476). Upstream (2026-12-04): the target's own posterior reads SDS's dim discs as rings "
    "(0.88 of the mass on ring components at t = 50-400, circles 0): this world's components have no contrast "
    "variation, so an exact disc at half contrast reads as a ring too, where SD reads a dimly lit ball as a ball; "
    "with contrast variation (prior.contrast_std=0.35) they read as circles, but stage 2 then dims them (source "
    "words 'oversaturated', 'cartoon' acting on SDS's under-saturated images) and Bridge still loses (2750 vs 2230); "
    "so does it with discrete contrast levels (prior.contrast_levels=[0.5,0.75,1], 2026-12-05), which read the dim "
    "discs as circles and keep CFG on settled images (experiments/exact/README.md, open in issue #12). From exact samples it holds (the test above): the gap is "
    "SDS's shape formation from randn, not the bridge direction. Measured cause (2026-12-05): the closed-form eps; "
    "with a network trained on this world as the prior (16 px, test_learned_prior_claims.py, an asserted check) "
    "Bridge beats SDS from randn (the shipped network, 2026-12-06: FD 741 vs 1300; the closed form at 16 px: 771 vs "
    "487), and on SDS's images the closed form's expected step adds texture (k = -1.1 at t = 300) where the "
    "network's removes it (+0.1; +0.5 at t = 500)"))
def test_bridge_second_stage_beats_sds_only(metrics):
    assert fd(metrics, "bridge") < fd(metrics, "sds")


@pytest.mark.timeout(3600)  # VSD trains its source online every step: ~1,100 s on one core
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "fails with the official VSD defaults too (issue #13: source trained before the image step, camera-only "
    "dropout; make test-slow, 2026-12-03); earlier VSD on world v2: FD 2493 for VSD vs 1445 for SDS, dim green and "
    "orange discs (saturation 0.15); round 1: 440 vs 839, held. Residual source at 16 channels trained on v as the "
    "official LoRA base: FD 1753 vs SDS 1610; without its mid-block attention (the default since 2026-12-06) 1743. "
    "Its fit, measured (experiments/exact/vsd_source_fit.py): after 1000 steps it closes ~half of the gap between "
    "the prior's diffusion loss and the particles' own score at t <= 400, 31% at t = 600 and 12% at t = 800 (eps "
    "target: 22% and none; 32 channels and mid-block attention fit alike), so at high t VSD's update "
    "is mostly CFG's text direction; whether SD's LoRA learns more there is not measured. It holds in the chroma "
    "variant world (prior.contrast_std=0.35 text_adherence=0.99 text_contrast_on=chroma, 2026-12-05): FD 1430 for "
    "VSD vs 1700 for SDS, where CFG acts on settled images; that variant fails other claims (open in issue #12; "
    "experiments/exact/README.md). With a network trained on this world as the prior (16 px, "
    "test_learned_prior_claims.py) VSD beats SDS from randn: FD 949 vs 1300, adherence 1.00 (the shipped network, "
    "2026-12-06; the first network: 514 vs 1309; the closed form at 16 px: 477 vs 487)"))
def test_vsd_beats_sds(metrics):
    assert fd(metrics, "vsd") < fd(metrics, "sds")


def test_nfsd_and_csd_are_no_better_than_sds(metrics):
    """Bridge paper's table: NFSD 91.70 and CSD 89.96 against SDS 86.02 COCO-FID (neither improves on SDS).
    Measured on world v2 (contrast + shape pull): NFSD 1910 and CSD 4470 against SDS 1610 (holds; CSD
    over-sharpens, sharpness 14.5)."""
    sds = fd(metrics, "sds")
    assert fd(metrics, "nfsd") > 0.9 * sds
    assert fd(metrics, "csd") > 0.9 * sds
