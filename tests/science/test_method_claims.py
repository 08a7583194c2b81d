"""The papers' claims about the methods, checked against ground truth on the exact prior (fixed seeds, 1000 steps).

One protocol for all claims: prompt "a red circle", 16 images from the common N(0, 1) init, each method with its
conf/guidance defaults (the official 2D settings), scored by exact metrics. A claim the exact prior does not
reproduce is marked ``xfail(strict=True)`` with the measured numbers and the measured world property that explains
it (experiments/exact/README.md): it is reported, not tuned away, and CI notices if it starts to hold.
"""

from __future__ import annotations

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
            if name == "ddim":
                row = reference_rows(analytic_prior, protocol)["DDIM 50 steps"]
            else:
                row = run_method(name, protocol, extra)
            cache[key] = row["exact_metrics"]["mean"]
            print(f"{key}: " + ", ".join(f"{k} {v:.3g}" for k, v in cache[key].items()))
        return cache[key]

    return get


def fd(metrics, name, *extra):
    return metrics(name, *extra)["fd"]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured on world v2 (contrast + shape pull): FD 2640 for sdi_cached at CFG 1 from randn vs 943 for DDIM and "
    "1610 for SDS; its images are red rings and crosses (recognizable 1.0, adherence 0) where DDIM's are red discs "
    "(adherence 1.0); cause not isolated (open in issue #12; experiments/exact/README.md)"))
def test_sdi_cached_is_almost_ddim_at_the_same_cfg(metrics):
    """The SDI paper's 2D claim: with the previous prediction as noise, SDS becomes DDIM. Compared at equal CFG
    (1, the DDIM reference's) and from the common init."""
    ours = fd(metrics, "sdi_cached", "guidance.scale=1", "target.init=randn")
    assert ours < 1.5 * fd(metrics, "ddim")
    assert ours < 0.5 * fd(metrics, "sds")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured on world v2 (contrast + shape pull): FD 2270 for sdi_cached at the notebook's settings vs 943 for "
    "DDIM (CFG 1) and ~1150 for DDIM at CFG 7.5. Its images are bright red discs (adherence 0.69) with twice the "
    "true chroma energy (saturation 2.2; DDIM at CFG 1: 1.18); cause not isolated (open in issue #12)"))
def test_sdi_cached_at_official_settings_is_almost_ddim(metrics):
    assert fd(metrics, "sdi_cached") < 1.5 * fd(metrics, "ddim")


@pytest.mark.skip(reason=(
    "not measured on world v2 yet: the SDI run (15 NFEs per step) passed the 900 s test limit while test suites "
    "shared the machine's cores; its exact-table row is pending (experiments/exact/README.md)"))
def test_sdi_beats_sds(metrics):
    assert fd(metrics, "sdi") < fd(metrics, "sds")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured on world v2 (contrast + shape pull): FD 2520 for Bridge vs 1610 for SDS, adherence 0. Stage 1 (SDS) "
    "ends at centred red discs; stage 2 (target words minus source words) turns them into red rings. With "
    "re-weighting only (text_contrast 0.03, text_pull 0: measured FD 3464) both stages ended at red crosses. Why "
    "stage 2 prefers rings here is not isolated (open in issue #12; experiments/exact/README.md)"))
def test_bridge_second_stage_beats_sds_only(metrics):
    assert fd(metrics, "bridge") < fd(metrics, "sds")


@pytest.mark.timeout(3600)  # VSD trains its source online every step: ~1,100 s on one core
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured on world v2 (contrast, shape and color pull): FD 2493 for VSD vs 1445 for SDS, dim green and orange "
    "discs (saturation 0.15); round 1: 440 vs 839, held; cause not isolated (open in issue #12; "
    "experiments/exact/README.md)"))
def test_vsd_beats_sds(metrics):
    assert fd(metrics, "vsd") < fd(metrics, "sds")


def test_nfsd_and_csd_are_no_better_than_sds(metrics):
    """Bridge paper's table: NFSD 91.70 and CSD 89.96 against SDS 86.02 COCO-FID (neither improves on SDS).
    Measured on world v2 (contrast + shape pull): NFSD 1910 and CSD 4470 against SDS 1610 (holds; CSD
    over-sharpens, sharpness 14.5)."""
    sds = fd(metrics, "sds")
    assert fd(metrics, "nfsd") > 0.9 * sds
    assert fd(metrics, "csd") > 0.9 * sds
