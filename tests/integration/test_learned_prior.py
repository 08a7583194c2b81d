"""``prior=learned``: the exact world with a trained network as its eps (sdbridge/priors/learned.py).

The networks here are trained for a few steps only: these tests check the plumbing (training on first use, the
checksummed cache, reproducibility, the word features, checkpoints refused for another world, exact metrics of a
run). What a fully trained network does is asserted by tests/science/test_learned_prior_claims.py (slow)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from sdbridge.priors.learned import (
    PROMPT_FEATURES,
    LearnedConfig,
    LearnedPrior,
    network_path,
    prompt_features,
    training_prompts,
)
from sdbridge.priors.vocabulary import UnknownWordError
from tests.conftest import run_cli

TINY = {"size": 16, "train_steps": 3, "batch": 4, "pool": 16, "refresh": 2, "channels": [16, 32], "device": "cpu"}
QUIET = ["logger=none", "trainer.progress_bar=false", "trainer.save_every=0", "trainer.checkpoint_every=0"]


@pytest.fixture(scope="module")
def tiny_config(world_cache, tmp_path_factory):
    return LearnedConfig(**TINY, cache_dir=str(world_cache), learned_dir=str(tmp_path_factory.mktemp("learned")))


@pytest.fixture(scope="module")
def tiny_prior(tiny_config):
    return LearnedPrior(tiny_config)


def test_word_features_are_the_parsed_prompt():
    f = prompt_features(["", "a red circle", "a red circle, front view, detailed high quality", "a circle, blurry"])
    assert f[0].sum() == 0  # the empty prompt: the unconditional distribution
    assert torch.equal(f[1], f[2])  # view and quality words are the identity, as in the exact prior
    on = {PROMPT_FEATURES[i] for i in torch.nonzero(f[3]).flatten().tolist()}
    assert on == {"circle", "blurry"}
    with pytest.raises(UnknownWordError, match="vocabulary|Vocabulary"):
        prompt_features(["a red car"])


def test_training_prompts_cover_the_runs_prompts():
    from sdbridge.eval.protocol import ExactProtocol
    from sdbridge.guidance.bridge import SOURCE_MODIFIER
    from sdbridge.guidance.nfsd import NFSD_NEGATIVE

    prompts, weights = training_prompts()
    assert abs(float(weights.sum()) - 1) < 1e-12 and (weights > 0).all()
    seen = {tuple(f.tolist()) for f in prompt_features(prompts)}
    wanted = [*ExactProtocol().prompts, "a yellow triangle", "a green ring", "a red circle" + SOURCE_MODIFIER,
              "a circle" + SOURCE_MODIFIER, f"a blue square, {NFSD_NEGATIVE}", "a star, painting", ""]
    for prompt in wanted:
        assert tuple(prompt_features([prompt])[0].tolist()) in seen, prompt


def test_network_is_trained_once_cached_with_a_checksum_and_reproducible(tiny_config, tiny_prior):
    path = network_path(tiny_config)
    assert path.is_file() and path.with_name(path.name + ".sha256.json").is_file()
    again = LearnedPrior(tiny_config)  # from the cache: the same weights
    for k, v in tiny_prior.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k
    # a damaged cache is retrained (with a warning), to the same weights: the training is seeded
    path.write_bytes(path.read_bytes()[:-100])
    retrained = LearnedPrior(tiny_config)
    for k, v in tiny_prior.net.state_dict().items():
        assert torch.equal(v, retrained.net.state_dict()[k]), k
    # another training seed is another network, in another cache file
    other = replace(tiny_config, train_seed=1)
    assert network_path(other) != path
    # the report compares the network's diffusion loss with the closed form's at each t
    assert [r["t"] for r in tiny_prior.checkpoint["report"]] == [50, 100, 300, 500, 700, 900]
    assert all(r["network"] > 0 and r["closed_form"] > 0 for r in tiny_prior.checkpoint["report"])


def test_eps_is_the_network_batched_over_conditionings(tiny_prior):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *tiny_prior.sample_shape, generator=gen)
    t = torch.tensor([300, 700])
    conds = [tiny_prior.encode_text(p) for p in (["", ""], ["a red circle", "a blue square, blurry"])]
    before = tiny_prior.nfe
    eps = tiny_prior.predict_eps(x, t, conds)
    assert eps.shape == (2, 2, *tiny_prior.sample_shape) and tiny_prior.nfe == before + 2
    direct = tiny_prior.net(x, t, prompt_features(["a red circle", "a blue square, blurry"]))
    assert torch.allclose(eps[1], direct, atol=1e-5)
    # not the closed form: the world's own eps differs
    from sdbridge.priors.analytic import AnalyticPrior

    exact = AnalyticPrior._predict_eps_batched(tiny_prior, x, t, conds)
    assert (eps - exact).abs().max() > 1e-2
    # the world is the analytic prior's: exact samples and metrics stay
    assert tiny_prior.has_true_distribution and tiny_prior.sample("a red circle", 3, gen).shape == (3, 3, 16, 16)


def test_bad_learned_config_names_the_key():
    with pytest.raises(ValueError, match="prior.channels"):
        LearnedConfig(channels=[12, 32])
    with pytest.raises(ValueError, match="prior.train_steps"):
        LearnedConfig(train_steps=0)
    with pytest.raises(ValueError, match="prior.size"):
        LearnedConfig(size=18)
    with pytest.raises(ValueError, match="prior.train_target.*noise, exact"):
        LearnedConfig(train_target="closed")
    with pytest.raises(ValueError, match="prior.difference_weight"):
        LearnedConfig(difference_weight=-1.0)


def test_difference_loss_regresses_the_closed_forms_conditioning_differences(tiny_prior):
    """``prior.difference_weight``: on the items of a batch drawn from a base prompt alone, the network's eps(prompt)
    - eps(partner) at the same x_t against the closed form's, the partner being the same base prompt with another
    training suffix, or the empty prompt; recomputed here by hand from the partners the network was called with."""
    from sdbridge.priors.analytic import AnalyticPrior
    from sdbridge.priors.learned import BASE_PROMPTS, difference_loss

    prompts, _ = training_prompts()
    features = prompt_features(prompts)
    gen = torch.Generator().manual_seed(0)
    nb = len(BASE_PROMPTS)
    # 8 items: 4 from base prompts alone (the empty one among them), 4 with a suffix (never used)
    which = torch.tensor([0, 8, 20, 48, nb + 3, 2 * nb + 9, 5 * nb + 30, 3 * nb])
    x0 = torch.cat([tiny_prior.sample(prompts[i], 1, gen) for i in which.tolist()]).float()
    t = torch.tensor([50, 300, 600, 900, 100, 200, 400, 800])
    x_t = tiny_prior.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
    calls = []

    def net(x, tt, f):  # a stand-in network whose eps depends on the conditioning and on x
        calls.append(f)
        return 0.3 * x + f.sum(1).view(-1, 1, 1, 1) * 0.01 + tt.view(-1, 1, 1, 1) * 1e-4

    pred = net(x_t, t, features[which])
    loss = difference_loss(tiny_prior, net, pred, x_t, t, which, prompts, features, torch.Generator().manual_seed(1))
    rows = [0, 1]  # a quarter of the batch, among the base items, in batch order
    partner_features = calls[-1]
    assert partner_features.shape[0] == len(rows)
    by_features = {tuple(f.tolist()): i for i, f in enumerate(features)}
    expected = []
    for row, f in zip(rows, partner_features):
        partner = by_features[tuple(f.tolist())]
        base = int(which[row])
        assert partner != base and (partner == 0 or partner % nb == base)  # "" or the same base, another suffix
        pair = [tiny_prior.encode_text([prompts[base]]), tiny_prior.encode_text([prompts[partner]])]
        exact = AnalyticPrior._predict_eps_batched(tiny_prior, x_t[row:row + 1], t[row:row + 1], pair)
        mine = pred[row:row + 1] - net(x_t[row:row + 1], t[row:row + 1], f.view(1, -1))
        expected.append(((mine - (exact[0] - exact[1]).float()) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-4, atol=1e-7)
    # a batch with no base item has nothing to compare
    assert difference_loss(tiny_prior, net, pred[4:], x_t[4:], t[4:], which[4:], prompts, features, gen) == 0
    # the option is part of the network's spec (its own cache file) only when on
    config = tiny_prior.config
    assert "difference_weight" not in replace(config, difference_weight=0.0).spec()
    assert network_path(replace(config, difference_weight=2.0)) != network_path(replace(config, difference_weight=0.0))


def test_training_with_the_difference_loss(tiny_prior, tmp_path):
    """A network trained with ``prior.difference_weight`` is its own (another cache file, other weights) and records
    the weight in its spec; the default training draws nothing for it (the shipped network's training is unchanged)."""
    weighted = LearnedPrior(replace(tiny_prior.config, difference_weight=1.0, learned_dir=str(tmp_path)))
    assert weighted.checkpoint["spec"]["difference_weight"] == 1.0
    assert weighted.checkpoint["file"] == str(network_path(weighted.config))
    assert any(not torch.equal(v, weighted.net.state_dict()[k]) for k, v in tiny_prior.net.state_dict().items())


def test_train_target_noise_or_the_exact_eps(tiny_prior):
    """``prior.train_target``: the drawn noise (the default, as SD is trained), or the closed form's eps of each image
    under its own prompt; the default keeps the cache key of networks trained before the option existed."""
    from sdbridge.priors.analytic import AnalyticPrior
    from sdbridge.priors.learned import regression_target

    gen = torch.Generator().manual_seed(0)
    prompts = ["a red circle", "a blue square, blurry", ""]
    x0 = torch.cat([tiny_prior.sample(p, 1, gen) for p in prompts]).float()
    t = torch.tensor([100, 500, 900])
    noise = torch.randn(x0.shape, generator=gen)
    x_t = tiny_prior.add_noise(x0, noise, t)
    config = tiny_prior.config
    assert regression_target(tiny_prior, config, x_t, t, noise, prompts) is noise
    exact = regression_target(tiny_prior, replace(config, train_target="exact"), x_t, t, noise, prompts)
    for i, prompt in enumerate(prompts):  # each image under its own prompt
        alone = AnalyticPrior._predict_eps_batched(tiny_prior, x_t[i:i + 1], t[i:i + 1],
                                                   [tiny_prior.encode_text([prompt])])[0]
        torch.testing.assert_close(exact[i:i + 1], alone.float(), rtol=1e-4, atol=1e-5)
    assert (exact - noise).abs().max() > 1e-2
    assert "train_target" not in config.spec() and replace(config, train_target="exact").spec()["train_target"] == "exact"
    assert network_path(replace(config, train_target="exact")) != network_path(config)


def test_run_with_prior_learned_scores_against_the_world(tiny_config, tiny_prior, world_cache, tmp_path):
    world = [f"prior.{k}={v}".replace(" ", "") for k, v in TINY.items()]
    common = ["prior=learned", *world, f"prior.cache_dir={world_cache}", f"prior.learned_dir={tiny_config.learned_dir}",
              "guidance=sds", "prompt.text=a red circle", "trainer.max_steps=2", *QUIET]
    out = tmp_path / "run"
    done = run_cli([*common, f"hydra.run.dir={out}"])
    assert done.returncode == 0, done.stdout[-3000:]
    assert "training the learned prior" not in done.stdout  # the fixture's network, from the cache
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exact_metrics"]["mean"]["fd"] > 0  # scored against the world's exact distribution
    # a checkpoint of another world is refused before the run writes anything
    other = replace(tiny_config, text_adherence=0.8, learned_dir=str(tmp_path / "other"))
    LearnedPrior(other)
    bad = tmp_path / "bad"
    refused = run_cli([*common, f"prior.checkpoint={network_path(other)}", f"hydra.run.dir={bad}"])
    assert refused.returncode != 0
    assert "another world: text_adherence=0.8 (run: 0.9)" in refused.stdout
    assert not bad.exists()
    missing = run_cli([*common, f"prior.checkpoint={tmp_path / 'none.pt'}", f"hydra.run.dir={bad}"])
    assert missing.returncode != 0 and "prior.checkpoint=" in missing.stdout and not bad.exists()


def test_conditional_difference_script_measures_the_networks_error(tiny_prior, tiny_config, monkeypatch, capsys):
    """experiments/exact/conditional_difference.py: a network equal to the closed form has no gap and cosine 1; on
    exact samples the exact Bridge difference vanishes at small t (measured: < 1e-3 RMS at t = 100), so what a network
    puts there is its own error."""
    import importlib.util

    from sdbridge.priors.analytic import AnalyticPrior
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("conditional_difference",
                                                  ROOT / "experiments" / "exact" / "conditional_difference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.compare(tiny_prior, ["a blue square"], ["blurry"], [100, 900], 8, seed=0)
    by = {(r["pair"], r["t"]): r for r in rows}
    assert set(by) == {(p, t) for p in ("bridge", "cfg", "blurry") for t in (100, 900)}
    assert by["bridge", 100]["exact"] < 1e-3 and by["bridge", 900]["exact"] > 1e-2
    assert by["bridge", 100]["network"] > 1e-3  # the 3-step network's difference is its error
    # the measurement itself: a "network" that is the closed form matches it exactly
    monkeypatch.setattr(type(tiny_prior), "_predict_eps_batched", AnalyticPrior._predict_eps_batched)
    same = {(r["pair"], r["t"]): r for r in module.compare(tiny_prior, ["a blue square"], ["blurry"], [900], 8, 0)}
    for key, row in same.items():
        assert row["error"] < 1e-6 and row["cos"] > 0.999, (key, row)
        assert abs(row["chroma_exact"] - row["chroma_network"]) < 1e-6, (key, row)
    # the color measure: a step along -d adds the image's own chroma (+1), takes it out (-1); a gray step does neither
    x0 = tiny_prior.sample("a red circle", 3, torch.Generator().manual_seed(0)).double()
    pixels = tiny_prior.to_pixels(x0)
    chroma = pixels - pixels.mean(1, keepdim=True)
    assert module.chroma_cosine(tiny_prior, x0, -chroma) == pytest.approx(1.0)
    assert module.chroma_cosine(tiny_prior, x0, chroma + 0.3) == pytest.approx(-1.0)
    assert abs(module.chroma_cosine(tiny_prior, x0, torch.randn(3, 1, 16, 16).expand(3, 3, 16, 16))) < 1e-6
    # the CLI reads prior=learned fields and prints one line per difference
    monkeypatch.undo()
    fields = [f"{k}={v}".replace(" ", "") for k, v in TINY.items()]
    module.main([*fields, f"cache_dir={tiny_config.cache_dir}", f"learned_dir={tiny_config.learned_dir}",
                 "--prompts", "a red circle", "--words", "smooth", "--ts", "500", "--n", "4"])
    out = capsys.readouterr().out
    assert "network" in out and all(f" {name}  t 500:" in out for name in ("bridge", "cfg", "smooth"))
    assert "takes color out" in out and out.count(" bridge  t 500:") == 2  # the differences, then their color


def test_processes_that_find_no_network_train_it_once(tiny_prior, tiny_config, tmp_path):
    """The jobs of a sweep that start together with no cached network: one trains it, the others wait for its lock
    and load its file (here the test holds the lock and trains; the job it started must wait, then not train)."""
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    from sdbridge.priors import cache
    from sdbridge.priors.learned import train_network
    from tests.conftest import ROOT

    config = replace(tiny_config, learned_dir=str(tmp_path / "shared"))
    path = network_path(config)
    log_file = tmp_path / "job.log"
    code = ("import json, logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s');"
            "from sdbridge.priors.learned import LearnedConfig, LearnedPrior;"
            f"LearnedPrior(LearnedConfig(**json.loads({json.dumps(json.dumps(asdict(config)))})))")
    with cache.exclusive(path, "learned-prior"):
        with open(log_file, "w") as out:
            job = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "waiting for it" not in log_file.read_text() and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert "waiting for it" in log_file.read_text(), log_file.read_text()
        train_network(tiny_prior, config, path)
    assert job.wait(timeout=120) == 0, log_file.read_text()
    assert "training the learned prior" not in log_file.read_text()


def test_the_default_network_ships_with_sdbridge_and_is_used_first(tiny_prior, tiny_config, tmp_path, monkeypatch,
                                                                   caplog):
    """The default config's network is in the package (so a first ``prior=learned`` run trains nothing), checksummed,
    for the default spec; a shipped network is used before the cache, ``prior.shipped=false`` ignores it, and a
    damaged one falls back to the cache with a warning."""
    import shutil

    from sdbridge.priors import cache, learned
    from sdbridge.priors.learned import ensure_network, load_network, shipped_network

    default = LearnedConfig(learned_dir=str(tmp_path / "empty"))
    path = shipped_network(default)
    assert path is not None and path.parent == learned.SHIPPED_DIR and cache.verify_file(path) is None
    assert load_network(path, default)["spec"] == default.spec()  # trained for the default config, not another one
    assert shipped_network(replace(default, shipped=False)) is None
    assert shipped_network(replace(default, train_seed=1)) is None  # another config: none shipped, trained on use

    # with the tiny network standing in for a shipped one
    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    source = network_path(tiny_config)
    for f in (source, cache.sidecar(source)):
        shutil.copy(f, shipped_dir / f.name)
    monkeypatch.setattr(learned, "SHIPPED_DIR", shipped_dir)
    config = replace(tiny_config, learned_dir=str(tmp_path / "cache"))
    ckpt = ensure_network(tiny_prior, config)
    assert ckpt["file"] == str(shipped_dir / source.name) and not network_path(config).exists()  # nothing trained
    own = ensure_network(tiny_prior, replace(config, shipped=False))  # trained into learned_dir
    assert own["file"] == str(network_path(config)) and network_path(config).is_file()
    assert ensure_network(tiny_prior, config)["file"] == str(shipped_dir / source.name)  # shipped before the cache
    (shipped_dir / source.name).write_bytes(source.read_bytes()[:-100])
    with caplog.at_level("WARNING", logger="sdbridge"):
        fallback = ensure_network(tiny_prior, config)
    assert fallback["file"] == str(network_path(config)) and "does not match its checksum" in caplog.text
