"""The exact world with a *trained* denoiser as the prior (``prior=learned``, sdbridge/priors/learned.py): what the
strict xfails of the closed form lack is a network's eps, not the world's data.

``prior=learned`` is a small word-conditioned UNet trained on exact samples of the 16 px world (the default config's
network ships with sdbridge, so nothing is trained here), then SDS and Bridge run from randn with it in place of the
closed-form eps, scored against the world's exact distributions. With the network the papers' picture appears from randn: SDS over-saturates and Bridge beats it; with
the closed form it does not (the strict xfails of test_exact_claims.py and test_method_claims.py). On the closed
form's own SDS images the two priors' expected steps differ in sign: the closed form adds texture, the network
removes it (experiments/exact/README.md, "A network trained on the world").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli

#: the module's fixture runs SDS and Bridge on the shipped network and SDS on the closed form inside the first test's time
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SCRIPTS = ROOT / "experiments" / "exact"
PROMPTS = ["prompt.texts=[a red circle,a blue square]", "prompt.repeat=4"]
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
def learned(tmp_path_factory, world_cache):
    """With the shipped network (a learned_dir of its own: a cached network is not used), run SDS (CFG 40), Bridge
    and, on the closed form, SDS at CFG 100 whose images both priors' gradients are measured on."""
    tmp = tmp_path_factory.mktemp("learned")
    learned = ["prior=learned", f"prior.cache_dir={world_cache}", f"prior.learned_dir={tmp / 'networks'}"]
    out = {}
    for name, overrides in (("sds", ["guidance=sds"]), ("bridge", ["guidance=bridge"])):
        done = run_cli([*learned, *overrides, *PROMPTS, *QUIET, f"hydra.run.dir={tmp / name}"])
        assert done.returncode == 0, done.stdout[-3000:]
        assert "training the learned prior" not in done.stdout  # the shipped network
        out[name] = metrics(tmp / name)
    exact_sds = tmp / "exact_sds"
    for name, scale in (("exact_sds", 100), ("exact_sds40", 40)):
        done = run_cli(["prior.size=16", f"prior.cache_dir={world_cache}", "guidance=sds", f"guidance.scale={scale}",
                        *PROMPTS, *QUIET, f"hydra.run.dir={tmp / name}"])
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = metrics(tmp / name)
    for prior, extra in (("closed form", []), ("network", ["--learned", "--learned-dir", tmp / "networks"])):
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
