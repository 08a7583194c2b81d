"""The exact prior: closed-form eps against autograd and dense algebra, text tilt, bounded modifier log-ratios,
model space, sampling, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sdbridge.metrics.exact import frechet_distance
from sdbridge.priors.analytic import (AnalyticConfig, AnalyticPrior, contrast_amplitudes, float32_normal,
                                      tilt_logits, to_work)
from sdbridge.priors.vocabulary import parse_prompt
from sdbridge.metrics.classify import classifier_for
from sdbridge.priors.world import COLORS, SHAPES, WorldSpec, build_world, clusters_per_shape, load_world
from sdbridge.sampling import ddim_sample
from tests.conftest import dense_components

PROMPTS = ["a red circle", "a circle", "", "a blue square, blurry, noisy", "a yellow ring, oversaturated, dark"]
SOURCE = ", oversaturated, smooth, pixelated, cartoon, foggy, hazy, blurry, bad structure, noisy, malformed"


def _noised(p, prompt, t, n, seed):
    g = torch.Generator().manual_seed(seed)
    abar = p.alphas_cumprod[t]
    x0 = p.sample(prompt, n, g).reshape(n, -1).double()
    return abar, abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)


def _assert_eps_is_autograd_score(p, prompt, t, x, abar):
    """eps of ``prompt`` at (x, t) equals -sqrt(1 - abar) times the float64 autograd score of the mixture's log-density;
    returns ``(eps (B, D), log p_t(x) (B,))``."""
    B = x.shape[0]
    x = x.detach().requires_grad_(True)
    logp = p.mixture(prompt).log_prob(x, abar.expand(B))
    (score,) = torch.autograd.grad(logp.sum(), x)
    eps = p.predict_eps(x.detach().float().reshape(B, *p.sample_shape), torch.full((B,), t),
                        [p.encode_text([prompt] * B)])[0].double().reshape(B, -1)
    expected = -(1 - abar).sqrt() * score
    torch.testing.assert_close(eps, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    return eps, logp.detach()


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("t", [0, 1, 100, 500, 900, 999])
def test_eps_is_minus_sqrt_one_minus_abar_times_autograd_score(small_analytic_prior, prompt, t):
    p = small_analytic_prior
    abar, x = _noised(p, prompt, t, 3, t)
    eps, _ = _assert_eps_is_autograd_score(p, prompt, t, x, abar)
    assert torch.isfinite(eps).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_woodbury_log_density_matches_dense_gaussians(small_analytic_prior, prompt):
    p = small_analytic_prior
    mix = p.mixture(prompt)
    abar = p.alphas_cumprod[300]
    x = torch.cat([_noised(p, prompt, 300, 2, 0)[1], torch.randn(2, mix.dim, dtype=torch.float64)])
    means, covs, logw = dense_components(mix)
    noised = abar * covs + (1 - abar) * torch.eye(mix.dim, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(abar.sqrt() * means, covariance_matrix=noised)
    dense = torch.logsumexp(mvn.log_prob(x.unsqueeze(1)) + logw, 1)
    torch.testing.assert_close(mix.log_prob(x, abar.expand(4)), dense, rtol=1e-9, atol=1e-6)
    assert float(torch.logsumexp(logw, 0)) == pytest.approx(0.0, abs=1e-12)


def test_mixed_precision_matches_float64(analytic_prior, world_cache):
    exact = AnalyticPrior(AnalyticConfig(cache_dir=str(world_cache), device="cpu", precision="float64"))
    g = torch.Generator().manual_seed(3)
    for prompt in ("a red circle", "a circle" + SOURCE):
        x0 = torch.cat([analytic_prior.sample(prompt, 4, g), torch.randn(4, *analytic_prior.sample_shape, generator=g)])
        for t in (0, 20, 300, 900):
            a = analytic_prior.alphas_cumprod[t].float()
            x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
            tt = torch.full((8,), t)
            fast = analytic_prior.predict_eps(x, tt, [analytic_prior.encode_text([prompt] * 8)])[0]
            ref = exact.predict_eps(x, tt, [exact.encode_text([prompt] * 8)])[0]
            assert float((fast - ref).norm() / ref.norm()) < 1e-5


def test_float32_operands_carry_no_subnormal_values(analytic_prior):
    """Subnormal float32 operands make CPU matmuls ~2x slower (experiments/bench/analytic.py): the casts set them to
    0 and keep every normal value exactly, and the prior's float32 bases and means (clean and corrupted) hold none."""
    tiny = torch.finfo(torch.float32).tiny
    v = torch.tensor([1e-300, -1e-40, 1e-45, tiny, -2.5, 0.0], dtype=torch.float64)
    out = float32_normal(v)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 0.0, 0.0, tiny, -2.5, 0.0]
    assert to_work(v, torch.zeros(1)).tolist() == out.tolist()
    assert to_work(v, torch.zeros(1, dtype=torch.float64)) is v  # float64 work: unchanged
    mix = analytic_prior.mixture("a red circle" + SOURCE)
    assert len({id(s.geo.Q_all) for s in mix.sets}) > 1  # corrupted copies with their own bases
    for s in mix.sets:
        for name in ("Q_all32", "mu32"):
            a = getattr(s.geo, name).abs()
            assert not bool(((a > 0) & (a < tiny)).any()), (s.key, name)


def test_responsibilities_sum_to_one(analytic_prior):
    mix = analytic_prior.mixture("")
    x = analytic_prior.sample("a circle", 8).reshape(8, -1).double()
    for t in (0, 500, 999):
        r = mix.responsibilities(x, analytic_prior.alphas_cumprod[t].expand(8))
        torch.testing.assert_close(r.sum(1), torch.ones(8, dtype=torch.float64))
        assert (r >= 0).all()


@pytest.mark.parametrize("variant", [{"text_contrast_on": "contrast"}, {"text_contrast_on": "chroma"},
                                     {"contrast_levels": [0.5, 0.75, 1.0]}], ids=["contrast", "chroma", "levels"])
def test_batched_mixed_prompts_equal_per_prompt_calls(analytic_prior, variant):
    """Batching logic, in float64 (the mixed precision's float32 projections differ by blocking, ~1e-5 relative)."""
    p = AnalyticPrior(AnalyticConfig(cache_dir=analytic_prior.config.cache_dir, device="cpu", precision="float64",
                                     text_contrast=0.15, **variant))
    prompts = ["a red circle", "a circle", "a red circle" + SOURCE, ""]
    x = torch.randn(4, *p.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 999, 250])
    both = p.predict_eps(x, t, [p.encode_text([""] * 4), p.encode_text(prompts)])
    for i, prompt in enumerate(prompts):
        single = p.predict_eps(x[i : i + 1], t[i : i + 1], [p.encode_text([prompt])])
        torch.testing.assert_close(both[1, i], single[0, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["float64", "mixed"])
def test_weighted_sums_back_project_once_and_equal_the_sums(analytic_prior, monkeypatch, precision):
    """``predict_eps(..., weights)``: each row is the weighted sum of the conditionings' eps (CFG with a negative
    scale, a three-way sum, a single weight), computed with one back-projection per basis per row (the CFG pair's
    saving); identity rows are the plain call bit for bit; NFEs count the conditionings; bad rows are refused."""
    p = AnalyticPrior(dataclasses.replace(analytic_prior.config, precision=precision))
    prompts = ["a red circle", "a circle", "a blue square" + SOURCE, ""]
    x = torch.randn(4, *p.sample_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([30, 400, 800, 990])
    conds = [p.encode_text([""] * 4), p.encode_text(prompts), p.encode_text(["a blue square"] * 4)]
    eps = p.predict_eps(x, t, conds).double()
    calls = []
    from sdbridge.priors.analytic import ComponentSet
    back_project = ComponentSet.back_project
    monkeypatch.setattr(ComponentSet, "back_project",
                        lambda self, *a: calls.append(self.basis_key()) or back_project(self, *a))
    bases = []  # the bases each conditioning back-projects on
    for j in range(3):
        calls.clear()
        p.predict_eps(x, t, [conds[j]])
        bases.append(set(calls))
    rows = [[-6.5, 7.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.0, 1.0]]
    for row in rows:  # one back-projection per basis of the row, however many terms share it
        calls.clear()
        p.predict_eps(x, t, conds, weights=[row])
        union = set().union(*(b for w, b in zip(row, bases) if w != 0))
        assert sorted(calls) == sorted(union)
    assert len(bases[0] | bases[1]) < len(bases[0]) + len(bases[1]), "the CFG pair shares no basis: nothing tested"
    nfe = p.nfe
    out = p.predict_eps(x, t, conds, weights=rows)
    assert p.nfe - nfe == 3 and out.shape == (3, *x.shape)
    for row, got in zip(rows, out):
        want = sum(w * e for w, e in zip(row, eps))
        scale = want.abs().max()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * float(scale))
    plain = p.predict_eps(x, t, conds)
    assert torch.equal(p.predict_eps(x, t, conds, weights=[[1, 0, 0], [0, 1, 0], [0, 0, 1]]), plain)
    with pytest.raises(ValueError, match="rows of 3 numbers"):
        p.predict_eps(x, t, conds, weights=[[1.0, 0.0]])


def test_weighted_sums_of_a_network_are_its_predictions_combined(stub_prior):
    """Priors without ``combines_linearly`` combine the predictions: CFG's weights give classifier_free_guidance
    bit for bit and a single weight of 1 the prediction itself (so the Stable Diffusion path is unchanged)."""
    from sdbridge.sampling import cfg_weights, classifier_free_guidance
    x, t = torch.randn(2, *stub_prior.sample_shape), torch.tensor([100, 700])
    conds = [stub_prior.encode_text(["", ""]), stub_prior.encode_text(["a cat", "a dog!"])]
    eps = stub_prior.predict_eps(x, t, conds)
    for scale in (7.5, -6.5, 100.0, 0.1):
        got = stub_prior.predict_eps(x, t, conds, weights=[cfg_weights(scale), [0, 1]])
        assert torch.equal(got[0], classifier_free_guidance(eps[0], eps[1], scale))
        assert torch.equal(got[1], eps[1])
    torch.testing.assert_close(stub_prior.predict_eps(x, t, conds, weights=[[2.0, 3.0]])[0], 2 * eps[0] + 3 * eps[1])


def test_text_tilts_one_shared_mixture(analytic_prior):
    p = analytic_prior
    adherence = p.config.text_adherence
    for prompt, named in (("a red circle", 1), ("a circle", 6), ("red or blue", 12)):
        logits = tilt_logits(parse_prompt(prompt), adherence)
        weights = logits.exp()
        mask = torch.tensor([[(s, c) in parse_prompt(prompt).concepts() for c in COLORS] for s in SHAPES])
        assert float(weights.sum()) == pytest.approx(1.0)
        assert float(weights[mask].sum()) == pytest.approx(adherence, abs=1e-9)
        assert int(mask.sum()) == named and bool((weights > 0).all())  # every concept keeps some mass
    # the right shape in the wrong color sits between the named concept and an unrelated one
    w = tilt_logits(parse_prompt("a red circle"), adherence)
    s, c = SHAPES.index("circle"), list(COLORS).index("red")
    assert w[s, c] > w[s, c - 1] > w[s - 1, c - 1]
    assert bool(torch.allclose(tilt_logits(parse_prompt(""), adherence).exp(), torch.full((6, 6), 1 / 36,
                                                                                           dtype=torch.float64)))
    # without the contrast and pull terms, log p(x | y) - log p(x) is bounded by log(max_k pi_y / pi_u), on any input
    flat = AnalyticPrior(AnalyticConfig(cache_dir=p.config.cache_dir, device="cpu", text_contrast=0.0,
                                        text_pull=0.0))
    cond, uncond = flat.mixture("a red circle"), flat.mixture("")
    bound = math.log(float(w.exp().max()) * 36)
    x = torch.cat([p.sample("a red circle", 8).reshape(8, -1), torch.randn(8, cond.dim) * 3]).double()
    for t in (0, 500):
        a = p.alphas_cumprod[t].expand(16)
        assert float((cond.log_prob(x, a) - uncond.log_prob(x, a)).max()) <= bound + 1e-9


def test_contrast_amplitudes_follow_the_named_attributes():
    b = 0.1
    amp = contrast_amplitudes(parse_prompt("a red circle"), b)
    s, c = SHAPES.index("circle"), list(COLORS).index("red")
    assert amp[s, c] == 1 and amp[s, c - 1] == amp[s - 1, c] == pytest.approx(1 - b / 2)
    assert amp[s - 1, c - 1] == pytest.approx(1 - b)
    circle = contrast_amplitudes(parse_prompt("a circle"), b)
    assert bool((circle[s] == 1).all()) and bool((circle[s - 1] == 1 - b).all())
    assert bool((contrast_amplitudes(parse_prompt("blurry, noisy"), b) == 1 - b).all())  # names no concept


def test_cfg_acts_at_every_noise_level_and_stays_bounded(analytic_prior):
    """Where the posterior has settled on one component (t <= 500), eps_cond - eps_uncond is the contrast term:
    nonzero and, for one settled component, exactly what a component of contrast ``1 - b + w b`` gives at CFG w."""
    p = analytic_prior
    b = p.config.text_contrast
    g = torch.Generator().manual_seed(4)
    z = p.sample("a red circle", 8, g)
    far = 3 * torch.randn(8, *p.sample_shape, generator=g)
    for t in (100, 300, 500, 900):
        a = p.alphas_cumprod[t].float()
        noised = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=g)
        for x in (noised, far):
            e = p.predict_eps(x, torch.full((8,), t), [p.encode_text([""] * 8), p.encode_text(["a red circle"] * 8)])
            gap = (e[1] - e[0]).double()
            assert float(gap.pow(2).mean().sqrt()) < 1.0  # bounded, on samples and far from the data
        if t <= 500:  # on noised samples of the prompt the gap does not vanish where the posterior has settled
            e = p.predict_eps(noised, torch.full((8,), t), [p.encode_text([""] * 8), p.encode_text(["a red circle"] * 8)])
            assert float((e[1] - e[0]).pow(2).mean().sqrt()) > 1e-3
    # one settled component: CFG at scale w on (uncond, cond) = the component with amplitude 1 - b + w b
    mix = p.mixture("a red circle")
    t, w = 200, 7.5
    a = p.alphas_cumprod[t]
    x = (a.sqrt() * z[:1].double() + (1 - a).sqrt() * torch.randn(z[:1].shape, generator=g, dtype=torch.float64))
    k = int(mix.responsibilities(x.reshape(1, -1), a.expand(1)).argmax())
    geo_g, col = k // 6, k % 6
    keep = torch.full_like(mix.log_pi[0], -math.inf)
    keep[geo_g, col] = 0.0
    amp = torch.ones_like(keep)
    amp[geo_g, col] = 1 - b + w * b
    alone = type(mix)(mix.prompt, mix.sets[:1], [keep], mix.concepts, mix.size, [amp])
    expected = -(1 - a).sqrt() * alone.score(x.reshape(1, -1), a.expand(1))
    e = p.predict_eps(x.float(), torch.full((1,), t), [p.encode_text([""]), p.encode_text(["a red circle"])]).double()
    cfg = e[0] + w * (e[1] - e[0])
    torch.testing.assert_close(cfg.reshape(1, -1), expected, rtol=1e-4, atol=1e-4)


def test_modifiers_mix_in_corrupted_copies_with_bounded_log_ratio(analytic_prior):
    p = analytic_prior
    clean, src = p.mixture("a red circle"), p.mixture("a red circle" + SOURCE)
    k = len(parse_prompt(SOURCE).modifiers)
    bound = math.log(1 + k * p.config.modifier_weight)
    assert len(src.sets) == 1 + k and src.sets[0] is clean.sets[0]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([p.sample("a red circle", 16, g), p.sample("a red circle" + SOURCE, 16, g),
                   torch.randn(16, *p.sample_shape, generator=g) * 2]).reshape(48, -1).double()
    for t in (0, 300, 900):
        a = p.alphas_cumprod[t].expand(48)
        ratio = clean.log_prob(x, a) - src.log_prob(x, a)
        assert float(ratio.max()) <= bound + 1e-9
    # on the concept's samples the bound is reached (the corrupted copies have no mass there; the generic component,
    # which both prompts hold with the same weight, has none either)
    a = torch.ones(16, dtype=torch.float64)
    y = p.sample_concept("circle", "red", 16, g).reshape(16, -1).double()
    assert float((clean.log_prob(y, a) - src.log_prob(y, a)).min()) == pytest.approx(bound, abs=0.05)


def test_model_space_is_in_scale_with_randn(analytic_prior):
    p = analytic_prior
    uncond = p.mixture("")
    data = type(uncond)("", uncond.sets, uncond.log_pi, uncond.concepts, uncond.size)  # the renderings: full contrast
    for mix, expected in ((data, 1.0), (uncond, 1 - p.config.text_contrast)):
        second = float(((mix.mean()) ** 2).sum() + mix.trace_cov()) / mix.dim
        assert second == pytest.approx(expected, abs=0.05)  # E|z|^2 / D = 1: unit variance like SD's scaled latents
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.decode(p.encode(images)), images, atol=1e-6, rtol=0)
    x = p.to_pixels(p.sample("a white square", 4))
    assert float(x.amax()) > 0.8 and float(x.amin()) < -0.7  # pixel units [-1, 1]: bright shape, dark background


def test_world_is_deterministic_and_cached(tmp_path):
    spec = WorldSpec(size=16, clusters=4, rank=4, coarse_clusters=2, coarse_rank=2, renders_per_cluster=16, seed=5)
    a, b = build_world(spec), build_world(spec)
    assert torch.equal(a.fine.mu, b.fine.mu) and torch.equal(a.fine.V, b.fine.V) and torch.equal(a.coarse.lam,
                                                                                                  b.coarse.lam)
    assert sorted(set(a.fine.shape.tolist())) == list(range(len(SHAPES)))
    config = dict(size=16, clusters=4, rank=4, coarse_clusters=2, coarse_rank=2, renders_per_cluster=16, seed=5,
                  cache_dir=str(tmp_path), device="cpu")
    p1 = AnalyticPrior(AnalyticConfig(**config))
    files = list(tmp_path.glob("world-*.pt"))
    assert len(files) == 1
    p2 = AnalyticPrior(AnalyticConfig(**config))
    assert torch.equal(p1.world.fine.mu, p2.world.fine.mu) and torch.equal(p1.world.fine.mu, a.fine.mu)
    files[0].write_bytes(files[0].read_bytes()[:100])  # a truncated cache is rebuilt, not an error
    assert torch.equal(load_world(spec, tmp_path).fine.mu, a.fine.mu)
    other = build_world(WorldSpec(size=16, clusters=4, rank=4, coarse_clusters=2, coarse_rank=2,
                                  renders_per_cluster=16, seed=6))
    assert not torch.equal(other.fine.mu, a.fine.mu)


def test_config_ranges_are_checked():
    with pytest.raises(ValueError, match="prior.size"):
        AnalyticConfig(size=8)
    with pytest.raises(ValueError, match="prior.rank"):
        AnalyticConfig(rank=0)
    with pytest.raises(ValueError, match="prior.text_adherence"):
        AnalyticConfig(text_adherence=1.0)
    with pytest.raises(ValueError, match="prior.precision"):
        AnalyticConfig(precision="half")
    with pytest.raises(ValueError, match="prior.noise_floor"):
        AnalyticConfig(noise_floor=0)
    with pytest.raises(ValueError, match="prior.templates"):
        AnalyticConfig(templates=-1)
    with pytest.raises(ValueError, match="prior.text_contrast_on"):
        AnalyticConfig(text_contrast_on="luma")
    with pytest.raises(ValueError, match="prior.contrast_std"):
        AnalyticConfig(contrast_std=-0.1)
    with pytest.raises(ValueError, match="prior.contrast_levels"):
        AnalyticConfig(contrast_levels=[0.5, 1.2])
    with pytest.raises(ValueError, match="prior.contrast_levels"):
        AnalyticConfig(contrast_levels=[0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="prior.contrast_levels.*text_contrast_on=contrast"):
        AnalyticConfig(contrast_levels=[0.5, 1.0], text_contrast_on="chroma")


@pytest.fixture(scope="module")
def contrast_prior(small_analytic_prior):
    """The 16 x 16 prior of ``small_analytic_prior`` with contrast variation (``prior.contrast_std``)."""
    return AnalyticPrior(dataclasses.replace(small_analytic_prior.config, contrast_std=0.3))


@pytest.mark.parametrize("prompt", ["a red circle", "a circle" + SOURCE])
@pytest.mark.parametrize("t", [1, 300, 900])
def test_contrast_variation_keeps_eps_exact(contrast_prior, prompt, t):
    abar, x = _noised(contrast_prior, prompt, t, 3, t)
    _assert_eps_is_autograd_score(contrast_prior, prompt, t, x, abar)


@pytest.fixture(scope="module")
def chroma_prior(small_analytic_prior):
    """``contrast_prior`` with the text contrast on the chroma only (``prior.text_contrast_on=chroma``)."""
    return AnalyticPrior(dataclasses.replace(small_analytic_prior.config, contrast_std=0.3, text_contrast=0.3,
                                             text_contrast_on="chroma"))


@pytest.mark.parametrize("prompt", ["a red circle", "a red", "", "a circle" + SOURCE])
@pytest.mark.parametrize("t", [1, 300, 900])
def test_chroma_text_contrast_keeps_eps_exact(chroma_prior, prompt, t):
    abar, x = _noised(chroma_prior, prompt, t, 3, t)
    _assert_eps_is_autograd_score(chroma_prior, prompt, t, x, abar)


def test_chroma_text_contrast_keeps_luminance_and_scales_chroma(chroma_prior):
    """An unnamed concept's mean keeps its gray level per pixel and ``1 - b`` of its chroma (``1 - b/2`` for a concept
    with one of the two named attributes); named ones are the clean ones; the masses are the plain text tilt's."""
    p, b = chroma_prior, chroma_prior.config.text_contrast
    mix, clean = p.mixture("a red circle"), p._component_set(None, parse_prompt("a red circle"))
    levels = {}
    (s,), (lp,) = mix.sets, mix.log_pi  # one set, 6 colors per level (level-major)
    for block in range(s.colors // 6):
        M = torch.linalg.lstsq(clean.delta, s.delta[6 * block : 6 * block + 6]).solution.T  # = clean.delta @ M.T
        gray = torch.full((3, 3), 1 / 3, dtype=M.dtype)
        level = float(M[0, 0] - M[0, 1])
        torch.testing.assert_close(M, level * torch.eye(3, dtype=M.dtype) + (1 - level) * gray)
        levels[round(level, 9)] = torch.isfinite(lp[:, 6 * block : 6 * block + 6])
    assert sorted(levels) == [round(1 - b, 9), round(1 - b / 2, 9), 1.0]
    assert bool((sum(f.int() for f in levels.values()) == 1).all())  # each component in exactly one block
    geo = clean.geo
    red, circle = list(COLORS).index("red"), list(SHAPES).index("circle")
    named = (geo.shape.view(-1, 1) == circle) & (torch.arange(6).view(1, -1) == red)
    half = (geo.shape.view(-1, 1) == circle) ^ (torch.arange(6).view(1, -1) == red)
    assert bool((levels[1.0] == named).all()) and bool((levels[round(1 - b / 2, 9)] == half).all())
    plain = AnalyticPrior(dataclasses.replace(p.config, text_contrast_on="contrast")).mixture("a red circle")
    total = torch.logsumexp(torch.stack([torch.logsumexp(lp.flatten(), 0) for lp in mix.log_pi]), 0)
    assert float(total) == pytest.approx(float(torch.logsumexp(torch.cat([lp.flatten() for lp in plain.log_pi]), 0)))


def test_chroma_palette_picks_each_components_level(chroma_prior):
    """The batched denoiser evaluates a palette set's component only in the column its prompt gives it
    (``Mixture.picks``), so log weights finite in two columns of one color are refused rather than half-ignored."""
    mix = chroma_prior.mixture("a red circle")
    (s,), (lp,), (pick,) = mix.sets, mix.log_pi, mix.picks
    assert s.palette and pick.shape == (lp.shape[0], 6)
    picked = lp.gather(1, pick)
    assert torch.equal(torch.logsumexp(picked, 1), torch.logsumexp(lp, 1))  # every finite weight is a picked one
    assert chroma_prior.mixture("").picks == [None]  # "" has one contrast level: 6 colors, not a palette
    both = lp.clone()
    both[:, 6:12] = lp[:, :6].clamp(min=-50)  # the first color block's weights, again in the second block
    with pytest.raises(ValueError, match="two color blocks"):
        type(mix)(mix.prompt, mix.sets, [both], mix.concepts, mix.size)


def test_chroma_text_contrast_survives_contrast_variation(chroma_prior, contrast_prior):
    """Lighting (``contrast_std``) scales a component's whole color offset, so a text contrast on the whole offset is
    absorbed on settled images at small t, and one on the chroma alone is not: RMS(eps_cond - eps_uncond) on noised
    exact samples of "a red circle" at t = 100."""
    def gap(p):
        abar, x = _noised(p, "a red circle", 100, 8, 0)
        x = x.float().reshape(8, *p.sample_shape)
        e = p.predict_eps(x, torch.full((8,), 100), [p.encode_text([""] * 8), p.encode_text(["a red circle"] * 8)])
        return float((e[1] - e[0]).pow(2).mean().sqrt())

    whole = AnalyticPrior(dataclasses.replace(contrast_prior.config, text_contrast=0.3))
    assert gap(chroma_prior) > 10 * gap(whole)


@pytest.fixture(scope="module")
def levels_prior(small_analytic_prior):
    """The 16 x 16 prior of ``small_analytic_prior`` with discrete contrast levels (``prior.contrast_levels``)."""
    return AnalyticPrior(dataclasses.replace(small_analytic_prior.config, contrast_levels=[0.5, 0.75, 1.0],
                                             text_contrast=0.3))


@pytest.mark.parametrize("prompt", ["a red circle", "", "a circle" + SOURCE])
@pytest.mark.parametrize("t", [1, 300, 900])
def test_contrast_levels_keep_eps_exact(levels_prior, prompt, t):
    abar, x = _noised(levels_prior, prompt, t, 3, t)
    _assert_eps_is_autograd_score(levels_prior, prompt, t, x, abar)


def test_contrast_levels_are_every_component_at_every_level(levels_prior, small_analytic_prior):
    """Each set holds the plain world's colors times each level (level-major), every column a component of its own
    (no picks) with the plain weight split equally over the levels and the text amplitude kept; pulled copies share
    the leveled base; samples of a concept come at every level."""
    levels = levels_prior.config.contrast_levels
    plain = AnalyticPrior(dataclasses.replace(levels_prior.config, contrast_levels=[]))
    for prompt in ("a red circle", "a circle" + SOURCE):
        mix, ref = levels_prior.mixture(prompt), plain.mixture(prompt)
        assert mix.picks == [None] * len(mix.sets) and len(mix.sets) == len(ref.sets)
        for s, lp, amp, r, rlp, ramp in zip(mix.sets, mix.log_pi, mix.amps, ref.sets, ref.log_pi, ref.amps):
            assert s.palette and not s.picked and (s.base is None) == (r.base is None)
            torch.testing.assert_close(s.delta * levels_prior.scale,  # in pixel units (the model spaces differ)
                                       torch.cat([level * r.delta * plain.scale for level in levels]))
            torch.testing.assert_close(lp, torch.cat([rlp - math.log(len(levels))] * len(levels), 1))
            torch.testing.assert_close(amp, torch.cat([ramp] * len(levels), 1))
            if s.base is not None:
                assert s.base.key == f"{r.base.key}|contrast 0.5,0.75,1" and s.base.delta is s.delta
    # the model space is that of the leveled data: dimmer on average, so a smaller scale
    assert levels_prior.scale < plain.scale
    x = levels_prior.sample_concept("circle", "red", 240, torch.Generator().manual_seed(0)).reshape(240, -1).double()
    mix = levels_prior.mixture("a red circle")
    s = mix.sets[0]
    resp = mix.responsibilities(x, torch.ones(240, dtype=torch.float64))[:, : s.geo.num * s.colors]
    column = resp.argmax(1) % s.colors
    assert bool((column % 6 == list(COLORS).index("red")).all())
    counts = torch.bincount(column // 6, minlength=len(levels))  # each level holds 1/3 of the samples
    assert bool((counts > 55).all()), counts


def test_contrast_levels_bound_brightness_and_read_dim_discs(levels_prior, contrast_prior, small_analytic_prior):
    """What the option is for, measured on exact samples of "a red circle" whose color offset is scaled by k: a
    brighter-than-rendered disc (k = 2 from the top level) is far off the data, as in the plain world and unlike
    Gaussian contrast variation (``contrast_std``); a disc at half contrast is read as a circle, as with
    ``contrast_std`` and unlike the plain world (which reads it as a ring)."""
    def probe(p):
        mix = p.mixture("a red circle")
        g = torch.Generator().manual_seed(0)
        z = p.sample("a red circle", 32, g).reshape(32, -1).double()
        one = torch.ones(32, dtype=torch.float64)
        offset, level = mix.color_offsets(z)  # level: the sample's contrast (1: the top level)
        top = level > 0.99
        bright = float((mix.log_prob(z[top] + offset[top], one[top]) - mix.log_prob(z[top], one[top])).median())
        half = z + (0.5 / level.view(-1, 1) - 1) * offset
        a = p.alphas_cumprod[100].double()
        noised = a.sqrt() * half + (1 - a).sqrt() * torch.randn(half.shape, generator=g, dtype=torch.float64)
        return bright, float(mix.shape_mass(noised, a.expand(32), "circle").mean())

    (b_levels, c_levels), (b_std, c_std), (b_plain, c_plain) = map(probe, (levels_prior, contrast_prior,
                                                                          small_analytic_prior))
    assert b_levels < 0.2 * b_plain < 0 and b_std > 0.02 * b_plain, (b_levels, b_std, b_plain)
    assert c_levels > 0.8 and c_std > 0.8 and c_plain < 0.5, (c_levels, c_std, c_plain)


def test_contrast_variation_is_the_mean_direction_with_the_configured_variance(small_analytic_prior, contrast_prior):
    """Each clean component's covariance gains exactly ``contrast_std^2 mu mu^T`` (mask units): along its mean it has
    the old variance plus ``0.3^2 |mu|^2``, and orthogonally to the old basis and the mean nothing changes."""
    old, new = small_analytic_prior._component_set(None).geo, contrast_prior._component_set(None).geo
    torch.testing.assert_close(new.mu, old.mu)
    cov = lambda geo: torch.einsum("gpr,gr,gqr->gpq", geo.Q, geo.lam, geo.Q)  # noqa: E731
    torch.testing.assert_close(cov(new), cov(old) + 0.3**2 * torch.einsum("gp,gq->gpq", old.mu, old.mu),
                               rtol=1e-9, atol=1e-9)
    assert new.rank == old.rank + 1


def test_exact_samples_and_ddim_land_near_the_true_distribution(analytic_prior):
    p = analytic_prior
    g = torch.Generator().manual_seed(0)
    for prompt in ("a red circle", "a circle"):
        mix = p.mixture(prompt)
        n = 64
        fd_ddim = frechet_distance(ddim_sample(p, [prompt] * n, num_steps=50, generator=g), mix)
        fd_random = frechet_distance(torch.randn(n, *p.sample_shape, generator=g), mix)
        # finite-sample FD of exact samples is the yardstick: DDIM stays within 1.5x of it, randn images are far off
        reference = frechet_distance(p.sample(prompt, n, g), mix)
        assert fd_ddim < 1.5 * reference, (fd_ddim, reference)
        assert fd_random > 3 * reference


def test_degraded_share_puts_degraded_copies_in_the_unconditional_distribution(world_cache):
    p = AnalyticPrior(AnalyticConfig(cache_dir=str(world_cache), device="cpu", degraded_share=0.4))
    for prompt, share in (("", 0.4), ("a red circle", 0.4 * (1 - p.config.text_adherence))):
        mix = p.mixture(prompt)
        mass = {s.key.split("|")[0]: float(torch.logsumexp(lp.flatten(), 0).exp())  # the set, pulled or not
                for s, lp in zip(mix.sets, mix.log_pi)}
        assert set(mass) == {"clean", "blurry", "low contrast"}
        g = p.config.generic_share  # the generic component holds g of every prompt's mass, the sets the rest
        assert mass["blurry"] + mass["low contrast"] == pytest.approx(share * (1 - g))
        assert sum(mass.values()) + math.exp(mix.log_generic) == pytest.approx(1.0)
    both = p.mixture("a red circle, blurry")  # a word in the prompt and in degraded_words: one set, masses added
    assert [s.key.split("|")[0] for s in both.sets].count("blurry") == 1
    with pytest.raises(ValueError, match="degraded_words"):
        AnalyticConfig(degraded_words=["fuzzy"])


def test_text_pull_moves_off_prompt_components_toward_the_prompt(analytic_prior):
    p = analytic_prior
    k = p.config.text_pull
    base, pulled = p.mixture("").sets[0], p.mixture("a red circle").sets[0]
    circle = base.geo.shape == SHAPES.index("circle")
    assert torch.equal(pulled.geo.mu[circle], base.geo.mu[circle])  # the named shape's components stay
    assert pulled.geo.Q is base.geo.Q  # same basis: the projections are shared
    nearest = base.geo.mu[circle][torch.cdist(base.geo.mu[~circle], base.geo.mu[circle]).argmin(1)]
    torch.testing.assert_close(pulled.geo.mu[~circle], (1 - k) * base.geo.mu[~circle] + k * nearest)
    assert torch.equal(pulled.delta, base.delta)  # colors are not pulled (the contrast term carries the color)
    assert p.mixture("a red circle").sets[0] is p.mixture("a blue circle").sets[0]  # one pulled set per shape set
    assert p.mixture("a red").sets[0] is p.mixture("").sets[0]  # a prompt that names no shape pulls nothing


def test_translation_equivariant_world_is_centred_templates_at_every_shift():
    spec = WorldSpec(size=16, clusters=4, rank=3, coarse_clusters=2, coarse_rank=2, renders_per_cluster=16,
                     templates=2, seed=5)
    world = build_world(spec)
    K, S = spec.max_shift, spec.size
    shifts = [(dy, dx) for dy in range(-K, K + 1) for dx in range(-K, K + 1)]
    G = world.fine.mu.shape[0] // len(shifts)
    assert G * len(shifts) == world.fine.mu.shape[0] and G == sum(clusters_per_shape(2))
    mu = world.fine.mu.view(len(shifts), G, S, S)
    V = world.fine.V.view(len(shifts), G, S, S, -1)
    template, basis = mu[shifts.index((0, 0))], V[shifts.index((0, 0))]
    for j, (dy, dx) in enumerate(shifts):  # every component is a rolled template, mean and basis alike
        assert torch.equal(mu[j], template.roll((dy, dx), (1, 2))) and torch.equal(V[j], basis.roll((dy, dx), (1, 2)))
    border = torch.ones(S, S, dtype=torch.bool)
    border[K:S - K, K:S - K] = False
    assert float(template[:, border].abs().max()) < 1e-9  # the shapes fit: no shift wraps a shape around the image
    ys = torch.arange(S, dtype=torch.float64) + 0.5 - S / 2
    mass = template.sum((1, 2))
    cy, cx = (template.sum(2) @ ys) / mass, (template.sum(1) @ ys) / mass
    assert float(torch.maximum(cy.abs(), cx.abs()).max()) < 1.0  # centred templates (the triangle's centroid is off)
    for s in range(len(SHAPES)):  # each shape's weights sum to one over its templates and shifts
        assert float(world.fine.log_w[world.fine.shape == s].exp().sum()) == pytest.approx(1.0, abs=1e-12)
    clustered = dataclasses.replace(spec, templates=0)
    assert spec.key() != clustered.key()
    assert clustered.key() == WorldSpec(size=16, clusters=4, rank=3, coarse_clusters=2, coarse_rank=2,
                                        renders_per_cluster=16, seed=5).key()


@pytest.fixture(scope="module")
def small_templates_prior(world_cache):
    """A 16 x 16 exact prior on the translation-equivariant world (``prior.templates``)."""
    return AnalyticPrior(AnalyticConfig(size=16, templates=2, rank=3, coarse_clusters=2, coarse_rank=2,
                                        renders_per_cluster=16, precision="float64", cache_dir=str(world_cache),
                                        device="cpu"))


@pytest.mark.parametrize("prompt", ["a red circle", "a blue square, blurry, noisy"])
@pytest.mark.parametrize("t", [100, 900])
def test_translation_equivariant_prior_keeps_eps_exact(small_templates_prior, prompt, t):
    abar, x = _noised(small_templates_prior, prompt, t, 3, t)
    _assert_eps_is_autograd_score(small_templates_prior, prompt, t, x, abar)


def test_translation_equivariant_samples_are_the_concept(world_cache):
    p = AnalyticPrior(AnalyticConfig(templates=4, rank=6, renders_per_cluster=30, cache_dir=str(world_cache),
                                     device="cpu"))
    g = torch.Generator().manual_seed(0)
    classifier = classifier_for(p)
    for shape, color in (("circle", "red"), ("star", "green"), ("ring", "white")):
        adherence, _ = classifier.adherence(p.sample_concept(shape, color, 32, g), [(shape, color)])
        assert adherence >= 0.95, (shape, color, adherence)


@pytest.fixture(scope="module")
def generic_prior(small_analytic_prior):
    """The small exact prior with the shared generic-image Gaussian (``prior.generic_share``)."""
    return AnalyticPrior(dataclasses.replace(small_analytic_prior.config, generic_share=0.1, generic_rank=64))


@pytest.mark.parametrize("t", [0, 20, 500, 999])
def test_generic_component_keeps_eps_exact(generic_prior, t):
    """With the generic Gaussian, eps is still -sqrt(1 - a) times the autograd score of the log-density, the
    log-density still matches dense Gaussians (the dense check for one prompt)."""
    p = generic_prior
    for prompt in ("a red circle", "a circle, blurry, noisy"):
        mix = p.mixture(prompt)
        assert mix.generic is p.mixture("").generic and math.exp(mix.log_generic) == pytest.approx(0.1)
        abar, x = _noised(p, prompt, t, 3, t)
        x = torch.cat([x, torch.randn(1, mix.dim, dtype=torch.float64)])
        _, logp = _assert_eps_is_autograd_score(p, prompt, t, x, abar)
        if t == 500 and prompt == "a red circle":  # dense (K, D, D) covariances: one prompt is enough
            means, covs, logw = dense_components(mix)
            noised = abar * covs + (1 - abar) * torch.eye(mix.dim, dtype=torch.float64)
            mvn = torch.distributions.MultivariateNormal(abar.sqrt() * means, covariance_matrix=noised)
            dense = torch.logsumexp(mvn.log_prob(x.unsqueeze(1)) + logw, 1)
            torch.testing.assert_close(logp, dense, rtol=1e-9, atol=1e-6)
            assert float(torch.logsumexp(logw, 0)) == pytest.approx(0.0, abs=1e-12)


def test_generic_component_has_the_data_moments_and_makes_the_denoiser_local(generic_prior, small_analytic_prior):
    p, plain = generic_prior, small_analytic_prior
    gen = p.mixture("").generic
    uncond = plain.mixture("")  # without the generic component: the moments it copies
    torch.testing.assert_close(gen.m, uncond.mean())
    assert float(gen.second_moment() - (gen.m**2).sum()) == pytest.approx(float(uncond.trace_cov()), rel=1e-9)
    # its top directions carry the covariance: X Sigma_gen X^T ~ X Sigma X^T on random probes (rank 64 of D = 768)
    X = torch.randn(8, gen.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    approx = (gen.cov_apply(X) - (X @ gen.m).unsqueeze(1) * gen.m) @ X.T
    exact = uncond.cov_apply(X) @ X.T
    assert float((approx.diagonal() / exact.diagonal() - 1).abs().max()) < 0.2
    # exact samples: a tenth of them come from it (no concept), moments follow the mixture
    g = torch.Generator().manual_seed(1)
    mix = p.mixture("a red circle")
    z = mix.sample(4000, g)
    assert float((z.mean(0) - mix.mean()).norm() / mix.mean().norm()) < 0.1
    assert float(((z - mix.mean()) ** 2).sum(1).mean() / mix.trace_cov()) == pytest.approx(1.0, abs=0.05)
    # off the data (the blurred average of the prompt's images, where SDS starts from at low CFG) at small t the
    # generic component takes the posterior, and CFG has nothing to act on there (every prompt holds the same one),
    # where the sharp mixture alone has a CFG gap of ~10% of eps; on the data it has no mass
    blob = plain.mixture("a red circle").mean().float().view(1, *p.sample_shape).expand(8, -1, -1, -1)
    a = p.alphas_cumprod[50]
    xt = a.sqrt() * blob + (1 - a).sqrt() * torch.randn(blob.shape, generator=g)
    assert float(mix.responsibilities(xt.reshape(8, -1).double(), a.expand(8))[:, -1].min()) > 0.99
    x0 = plain.sample_concept("circle", "red", 8, g).reshape(8, -1).double()
    assert float(mix.responsibilities(a.sqrt() * x0, a.expand(8))[:, -1].max()) < 1e-6
    gaps = []
    for prior in (p, plain):
        eps = prior.predict_eps(xt, torch.full((8,), 50), [prior.encode_text([""] * 8),
                                                           prior.encode_text(["a red circle"] * 8)])
        gaps.append(float((eps[1] - eps[0]).norm() / eps[0].norm()))
    assert gaps[0] < 1e-3 and gaps[1] > 0.05, gaps



def test_kept_shrinkage_gives_the_same_eps_when_full_and_across_batches(world_cache, monkeypatch):
    """Each component set keeps the shrinkage of the noise levels it has seen (``_shrinkage_at``): eps is
    bit-identical to one computed with nothing kept, also when the kept levels overflow the limit in a batch that
    mixes kept and new levels."""
    from sdbridge.priors import analytic

    monkeypatch.setattr(analytic, "SHRINK_CACHE_LEVELS", 5)
    texts = ["a red circle", "a blue square", "a circle", ""]
    seen, fresh = (AnalyticPrior(AnalyticConfig(cache_dir=str(world_cache), device="cpu")) for _ in range(2))
    x = torch.randn(4, *seen.sample_shape, generator=torch.Generator().manual_seed(0))
    cond_seen, cond_fresh = [seen.encode_text(texts)], [fresh.encode_text(texts)]
    fresh_sets = {id(s.base or s): s.base or s for mix in cond_fresh[0].value for s in mix.sets}
    for t in ([10, 20, 30, 40], [10, 20, 50, 60], [70, 70, 70, 70], [80, 20, 90, 10]):
        t = torch.tensor(t)
        for s in fresh_sets.values():
            s._shrink_cache.clear()
        assert torch.equal(seen.predict_eps(x, t, cond_seen), fresh.predict_eps(x, t, cond_fresh))
