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


@pytest.mark.xfail(strict=True, reason=(
    "measured on world v2: FD 2743 for sdi_cached at CFG 1 from randn vs 952 for DDIM and 1775 for SDS; "
    "cause not isolated yet (open in issue #12; experiments/exact/README.md)"))
def test_sdi_cached_is_almost_ddim_at_the_same_cfg(metrics):
    """The SDI paper's 2D claim: with the previous prediction as noise, SDS becomes DDIM. Compared at equal CFG
    (1, the DDIM reference's) and from the common init."""
    ours = fd(metrics, "sdi_cached", "guidance.scale=1", "target.init=randn")
    assert ours < 1.5 * fd(metrics, "ddim")
    assert ours < 0.5 * fd(metrics, "sds")


@pytest.mark.xfail(strict=True, reason=(
    "measured on world v2: FD 2088 for sdi_cached at the notebook's settings vs 952 for DDIM; cause not isolated yet (open in issue #12; experiments/exact/README.md)"))
def test_sdi_cached_at_official_settings_is_almost_ddim(metrics):
    assert fd(metrics, "sdi_cached") < 1.5 * fd(metrics, "ddim")


@pytest.mark.skip(reason=(
    "not measured on world v2 yet: the SDI run (15 NFEs per step) passed the 900 s test limit while test suites "
    "shared the machine's cores; its exact-table row is pending (experiments/exact/README.md)"))
def test_sdi_beats_sds(metrics):
    assert fd(metrics, "sdi") < fd(metrics, "sds")


@pytest.mark.xfail(strict=True, reason=(
    "measured on world v2: FD 3514 for Bridge vs 1775 for SDS, adherence 0. Stage 1 (SDS) ends at a dim centred "
    "blob that cross and star components explain far better than a disc (log-likelihood -337 vs -3163 nats), "
    "because text only re-weights shared components and eps_cond - eps_uncond is ~0 once the posterior settles "
    "(RMS 3e-7 at t = 500, calibration row 5); stage 2 sharpens toward crosses. SD's CFG gap is nonzero at every t"))
def test_bridge_second_stage_beats_sds_only(metrics):
    assert fd(metrics, "bridge") < fd(metrics, "sds")


@pytest.mark.xfail(strict=True, reason=(
    "measured on world v2: FD 2482 for VSD vs 1775 for SDS (round 1: 440 vs 839, held); cause not isolated yet (open in issue #12; experiments/exact/README.md)"))
def test_vsd_beats_sds(metrics):
    assert fd(metrics, "vsd") < fd(metrics, "sds")


def test_nfsd_and_csd_are_no_better_than_sds(metrics):
    """Bridge paper's table: NFSD 91.70 and CSD 89.96 against SDS 86.02 COCO-FID (neither improves on SDS).
    Measured on world v2: CSD 4480 against SDS 1775 (holds; CSD over-sharpens, sharpness 14)."""
    sds = fd(metrics, "sds")
    assert fd(metrics, "nfsd") > 0.9 * sds
    assert fd(metrics, "csd") > 0.9 * sds
