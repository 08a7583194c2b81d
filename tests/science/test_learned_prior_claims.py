"""The exact world with a *trained* denoiser as the prior (``prior=learned``, sdbridge/priors/learned.py): the papers'
claims from randn, where the closed form's strict xfails lack a network's eps, not the world's data.

``prior=learned`` is a small word-conditioned UNet trained on exact samples of the 16 px world (the default config's
network ships with sdbridge, so nothing is trained here). Every method runs from randn with it in place of the
closed-form eps, scored against the world's exact distributions. With the network, SDS over-saturates, Bridge and VSD
beat it, VSD + full bridge is on par with VSD, NFSD and CSD trail SDS, and sdi_cached is DDIM at CFG 1; with the
closed form Bridge and VSD do not beat SDS (the strict xfails of test_exact_claims.py and test_method_claims.py). SDI
against SDS, and sdi_cached at CFG 8.5, fail with the network: strict xfails whose cause is measured, the network's
CFG difference where the exact eps's is right (asserted: its DDIM at CFG 8.5, and SDI's inversion at CFG -6.5 on
exact samples); with SDI's inversion at CFG 1, and with sdi_cached's Adam reaching each target, both hold. On the
closed form's own SDS images the two priors' expected steps differ in sign: the closed form adds texture, the network
removes it (experiments/exact/README.md, "A network trained on the world").
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli

#: each method runs once, inside the first test that needs it (the first test also runs the closed form's SDS)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SCRIPTS = ROOT / "experiments" / "exact"
PROMPT_TEXTS, REPEAT = ["a red circle", "a blue square"], 4
PROMPTS = [f"prompt.texts=[{','.join(PROMPT_TEXTS)}]", f"prompt.repeat={REPEAT}"]
QUIET = ["logger=none", "trainer.progress_bar=false", "trainer.save_every=0", "trainer.checkpoint_every=0"]


def script(name: str, *args, timeout: int = 1500) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["exact_metrics"]["mean"]


@pytest.fixture(scope="module")
def network_dir(tmp_path_factory):
    """The module's ``prior.learned_dir``: empty, so the shipped network is used (a cached one is not)."""
    return tmp_path_factory.mktemp("networks")


@pytest.fixture(scope="module")
def network(tmp_path_factory, world_cache, network_dir):
    """``network(name, *overrides)``: the mean exact metrics of guidance ``name`` run from randn with the shipped
    network on the module's protocol, each run once;
    ``network("ddim@<scale>")``: the network's own DDIM samples (50 steps) at that CFG, seed 0."""
    tmp = tmp_path_factory.mktemp("network")
    learned = ["prior=learned", f"prior.cache_dir={world_cache}", f"prior.learned_dir={network_dir}"]
    cache: dict[tuple, dict] = {}

    @functools.cache
    def prior():
        """The network as a prior object, loaded once for every ddim@ row."""
        from sdbridge.priors.learned import LearnedConfig, LearnedPrior

        return LearnedPrior(LearnedConfig(cache_dir=str(world_cache), learned_dir=str(network_dir), device="cpu"))

    def get(name: str, *extra: str) -> dict:
        key = (name, *extra)
        if key in cache:
            return cache[key]
        if name.startswith("ddim@"):
            from sdbridge.eval.protocol import ExactProtocol, reference_rows

            protocol = ExactProtocol(prompts=PROMPT_TEXTS, images_per_prompt=REPEAT, prior="learned")
            rows = reference_rows(prior(), protocol, scales=(float(name.partition("@")[2]),))
            cache[key] = next(v for k, v in rows.items() if k.startswith("DDIM"))["exact_metrics"]["mean"]
        else:
            run_dir = tmp / f"{len(cache)}_{name}"
            done = run_cli([*learned, f"guidance={name}", *extra, *PROMPTS, *QUIET, f"hydra.run.dir={run_dir}"],
                           timeout=3000)
            assert done.returncode == 0, done.stdout[-3000:]
            assert "training the learned prior" not in done.stdout  # the shipped network
            cache[key] = metrics(run_dir)
        print(f"{key}: " + ", ".join(f"{k} {v:.3g}" for k, v in cache[key].items()))
        return cache[key]

    return get


def fd(network, name, *extra) -> float:
    return network(name, *extra)["fd"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory, world_cache, network, network_dir):
    """SDS (CFG 40) and Bridge with the shipped network and, on the closed form, SDS at CFG 100 whose images both
    priors' gradients are measured on."""
    tmp = tmp_path_factory.mktemp("learned")
    out = {name: network(name) for name in ("sds", "bridge")}
    exact_sds = tmp / "exact_sds"
    for name, scale in (("exact_sds", 100), ("exact_sds40", 40)):
        done = run_cli(["prior.size=16", f"prior.cache_dir={world_cache}", "guidance=sds", f"guidance.scale={scale}",
                        *PROMPTS, *QUIET, f"hydra.run.dir={tmp / name}"])
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = metrics(tmp / name)
    for prior, extra in (("closed form", []), ("network", ["--learned", "--learned-dir", network_dir])):
        rows = tmp / f"noise_{len(extra)}.json"
        script("gradient_noise.py", exact_sds, "--scales", "100", "--ts", "300", "500", *extra, "--json", rows)
        out[prior] = {r["t"]: r for r in json.loads(rows.read_text())["rows"] if r["images"] == "the run's images"}
    print({k: v for k, v in out.items()})
    return out


def test_with_a_trained_network_sds_over_saturates_from_randn(learned):
    """Measured (2026-12-06, the shipped network, trained with the difference loss): saturation 3.54 with the network
    at CFG 40 (smooth, bright, alike discs and squares, collapse 0.43; the network trained on the diffusion loss alone:
    2.39; the 3,500-step one: 4.02), 0.79 with the closed form (dim discs and squares)."""
    assert learned["sds"]["saturation"] > 1.3
    assert learned["exact_sds40"]["saturation"] < learned["sds"]["saturation"] - 0.5


def test_with_a_trained_network_bridge_beats_sds_from_randn(learned):
    """Measured (2026-12-06, the shipped network): FD 741 for Bridge (saturation 0.66) against 1300 for SDS with the
    network (trained on the diffusion loss alone: 987, saturation 0.14, against 1592; the 3,500-step network: 783
    against 1664); with the closed form Bridge loses (771 against 487 at 16 px; the strict xfail at 32 px)."""
    assert learned["bridge"]["fd"] < 0.9 * learned["sds"]["fd"]


def test_the_closed_form_adds_texture_where_a_trained_network_removes_it(learned):
    """On the closed form's SDS images (CFG 100, 16 px), the expected SDS step's share of the images' fine texture
    it removes: measured -1.11 / -0.41 (closed form) against +0.09 / +0.50 at t = 300 / 500 (the shipped network,
    trained with the difference loss; on the diffusion loss alone: +1.25 / +2.28; the 3,500-step one: +1.71 / +1.95).
    The difference loss brings the network's CFG differences toward the exact ones (experiments/exact/README.md),
    and its texture removal at t = 300 with them; the signs stay opposite, by 1.2 and 0.9."""
    for t in (300, 500):
        assert learned["closed form"][t]["k"] < 0, learned["closed form"][t]
        assert learned["network"][t]["k"] > 0, learned["network"][t]
        assert learned["network"][t]["k"] - learned["closed form"][t]["k"] > 0.6, (learned["network"][t],
                                                                                  learned["closed form"][t])


# ---------------------------------------------------------------------------------------------------------------
# The papers' other claims, from randn with the shipped network, measured 2026-12-06 on the module's protocol (2 prompts
# x 4 images, seed 0; SDS: FD 1300). The full table (3 prompts x 16) is experiments/exact/README.md's section "The same
# world with a trained network as the prior"; the closed form's results are test_method_claims.py's.


def test_with_a_trained_network_vsd_beats_sds_from_randn(network):
    """VSD (ProlificDreamer; Bridge paper's table: 59.22 against SDS's 86.02 COCO-FID). Measured: FD 949 against
    1300, adherence 1.0 (2026-12-06, the residual source without mid-block attention; 917 with it; the full table,
    with it: 1207 against 1938)."""
    assert fd(network, "vsd") < 0.9 * fd(network, "sds")


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured (2026-12-06, the shipped network): FD 1490 for SDI against 1300 for SDS (saturation 2.25, adherence "
    "0.12; soft, off-centre red blobs and fragmented blue shapes). Not the code (our SDI gradient equals threestudio's, "
    "tests/parity) but the network under SDI's CFG -6.5 inversion: with a CFG 1 inversion SDI beats SDS (671 against "
    "1300, the asserted check below), and on exact samples the network's -6.5 inversion puts its targets 2.3x / 2.6x "
    "as far from x0 as the exact eps's at t = 500 / 700 (0.63 / 1.08 against 0.28 / 0.41; 0.37 / 0.54 with a CFG 1 "
    "inversion), "
    "because its CFG difference, which the inversion multiplies by 7.5, is off by as much as its own size at "
    "t = 500 / 700 (gap 0.019 / 0.027 RMS against exact differences of 0.020 / 0.029, cosine +0.63 / +0.52, on exact "
    "samples: experiments/exact/conditional_difference.py); its own DDIM at CFG 8.5 scores FD 1690 against the exact "
    "eps's 676. "
    "Stable Diffusion's DDIM at CFG 7.5 is its standard sampler, and -7.5 is the official inversion CFG for it "
    "(threestudio, the SDI notebook)"))
def test_with_a_trained_network_sdi_beats_sds_from_randn(network):
    """SDI (its paper: better than SDS, whose fresh noise every step over-smooths)."""
    assert fd(network, "sdi") < 0.9 * fd(network, "sds")


def test_with_a_trained_network_sdi_with_a_cfg_1_inversion_beats_sds_from_randn(network):
    """The xfail above, with the inversion at CFG 1 instead of -6.5 (``guidance.inversion_scale=1``): measured FD 671
    against 1300 for SDS, saturation 1.35, collapse 0.08 (red ovals and blue squares, some light blue)."""
    assert fd(network, "sdi", "guidance.inversion_scale=1") < 0.9 * fd(network, "sds")


def test_the_networks_cfg_is_off_where_the_exact_eps_is_not(network_dir, world_cache, tmp_path):
    """The testbed property both xfails of this module come down to, measured by experiments/exact/cfg_sweep.py on
    the module's prompts (4 images each; the README's tables: 16). The network's DDIM at CFG 8.5 scores FD 1690 and
    saturation 5.23 against 676 and 1.70 with the exact eps, where at CFG 3 the two are alike (462 against 499).
    SDI's CFG -6.5 inversion of exact samples puts the network's targets 0.63 / 1.08 from x0 at t = 500 / 700 against
    the exact eps's 0.28 / 0.41; with a CFG 1 inversion the network's are 0.37 / 0.54 (the exact eps's 0.28 / 0.70):
    the negative inversion CFG costs the network, not the exact eps."""
    rows = {}
    for name, args in (("ddim", ["--scales", "3", "8.5"]), ("inversion", ["--inversion", "--ts", "500", "700"])):
        script("cfg_sweep.py", *args, "--learned-dir", network_dir, "--cache-dir", world_cache,
               "--json", tmp_path / f"{name}.json")
        rows[name] = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    ddim = {(r["prior"], r["scale"]): r for r in rows["ddim"]}

    def gap(scale: float) -> float:
        return ddim[("network", scale)]["fd"] / ddim[("closed form", scale)]["fd"]

    assert gap(8.5) > 2 * gap(3), ddim
    assert ddim[("network", 8.5)]["saturation"] > 2 * ddim[("closed form", 8.5)]["saturation"], ddim
    inv = {(r["prior"], r["inversion_scale"], r["t"]): r["target_error"] for r in rows["inversion"]}
    for t in (500, 700):
        assert inv[("network", -6.5, t)] > 1.5 * inv[("closed form", -6.5, t)], inv
        assert inv[("network", -6.5, t)] > 1.3 * inv[("network", 1, t)], inv
        assert inv[("closed form", -6.5, t)] < 1.2 * inv[("closed form", 1, t)], inv


def test_with_a_trained_network_sdi_cached_is_almost_ddim_at_cfg_1(network):
    """SDI's 2D claim: with the previous prediction as kappa, SDS becomes DDIM. At CFG 1 (init too) against the
    network's own DDIM at CFG 1. Measured: FD 549 against 618, saturation 0.68 against 0.94, both collapse 0."""
    ours, ddim = network("sdi_cached", "guidance.scale=1", "target.init_cfg=1"), network("ddim@1")
    assert ours["fd"] < 1.5 * ddim["fd"]
    assert ours["collapse"] < ddim["collapse"] + 0.1


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured (2026-12-06, the shipped network): at the notebook's CFG (8.5 here) FD 5090 for sdi_cached against 2500 "
    "for the network's DDIM at 8.5, saturation 13.1 against 6.5: DDIM's shapes and colors on speckled backgrounds. "
    "Not the code (it holds at CFG 1, the check above, and with the closed form at 8.5, test_method_claims.py) but the "
    "network's targets off DDIM's path: at the notebook's Adam lr 0.1 the image is still RMS 0.67 / 1.18 / 0.79 from "
    "each target when the next is computed at t = 956 / 931 / 908 (CFG 1: 0.016 at t = 931); with lr 0.5 the lag is "
    "0.15-0.20 and the check passes (the asserted check below). The closed form lags as much (0.6-1.5) and holds, so "
    "what fails is the network's CFG 8.5 prediction from a lagging image (its CFG difference is off: "
    "test_the_networks_cfg_is_off_where_the_exact_eps_is_not). With Stable Diffusion the SDI paper reports this mode "
    "'almost identical to DDIM' at the notebook's settings"))
def test_with_a_trained_network_sdi_cached_at_official_settings_is_almost_ddim(network):
    """The notebook's settings (CFG 8.5 here, refresh every 25 steps) against the network's DDIM at CFG 8.5."""
    ours, ddim = network("sdi_cached"), network("ddim@8.5")
    assert ours["fd"] < 1.5 * ddim["fd"]
    assert ours["saturation"] < 1.5 * ddim["saturation"]


def test_with_a_trained_network_sdi_cached_reaching_its_targets_is_almost_ddim_at_cfg_8_5(network):
    """The xfail above with Adam's lr 0.5 instead of 0.1 (``target.optimizer.lr=0.5``), so the image reaches each
    target before the next refresh (RMS lag 0.15-0.20 at t >= 900 against 0.67-1.18). Measured: FD 1565 against 2500
    for the network's DDIM at 8.5, saturation 4.9 against 6.5: clean red discs and blue squares."""
    ours, ddim = network("sdi_cached", "target.optimizer.lr=0.5"), network("ddim@8.5")
    assert ours["fd"] < 1.5 * ddim["fd"]
    assert ours["saturation"] < 1.5 * ddim["saturation"]


@pytest.mark.timeout(3600)  # the full bridge costs 24 NFEs a step: ~8 min here
def test_with_a_trained_network_vsd_full_bridge_is_on_par_with_vsd(network):
    """Bridge paper's table: VSD + full bridge 55.65 against VSD's 59.22 COCO-FID, a 6% gain, below what FD on 4
    images per prompt resolves. Asserted: it beats SDS (as VSD does, the test above) and stays within 20% of VSD.
    Measured: FD 1065 against 949 for VSD (2026-12-06, the residual source without mid-block attention; 1040
    against 917 with it; the full table, with it: 1105 against 1207, an 8% gain)."""
    vsd, full = fd(network, "vsd"), fd(network, "vsd_full_bridge")
    assert full < 0.9 * fd(network, "sds")
    assert full < 1.2 * vsd


def test_with_a_trained_network_nfsd_and_csd_are_no_better_than_sds(network):
    """Bridge paper's table: NFSD 91.70 and CSD 89.96 against SDS 86.02 COCO-FID. Measured: NFSD 2000 and CSD 2230
    against 1300 (over-bright and over-sharpened: saturation 4.7 and 4.9, sharpness 2.1 and 2.4)."""
    sds = fd(network, "sds")
    assert fd(network, "nfsd") > 0.9 * sds
    assert fd(network, "csd") > 0.9 * sds
