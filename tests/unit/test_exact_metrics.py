"""Exact metrics: the closed forms against dense computations and Monte Carlo, and their behaviour on known sets;
the nearest-template classifier."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from sdbridge.metrics.classify import classifier_for
from sdbridge.metrics.exact import (
    LAPLACIAN,
    collapse_score,
    exact_metrics,
    frechet_distance,
    highpass,
    nll_bits_per_dim,
    saturation_ratio,
    sharpness_ratio,
)
from sdbridge.priors.analytic import AnalyticPrior
from sdbridge.priors.world import BACKGROUND, COLORS, SHAPES, render_shapes
from tests.conftest import dense_components


def _dense_moments(mix):
    means, covs, logw = dense_components(mix)
    pi = logw.exp()
    m = (pi.unsqueeze(1) * means).sum(0)
    second = (pi.view(-1, 1, 1) * (covs + means.unsqueeze(2) * means.unsqueeze(1))).sum(0)
    return m, second - torch.outer(m, m)


@pytest.mark.parametrize("prompt", ["a green ring", "a circle, hazy"])
def test_frechet_distance_and_moments_match_dense_formulas(small_analytic_prior, prompt):
    p = small_analytic_prior
    mix = p.mixture(prompt)
    x = p.sample("a circle", 40, torch.Generator().manual_seed(0)) + 0.1
    X = x.reshape(40, -1).double().numpy()
    m2, c2 = _dense_moments(mix)
    torch.testing.assert_close(mix.mean(), m2)
    probe = torch.randn(3, mix.dim, dtype=torch.float64)
    torch.testing.assert_close(mix.cov_apply(probe), probe @ c2)
    m1, c1 = X.mean(0), np.cov(X, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2.numpy())
    dense = float(((m1 - m2.numpy()) ** 2).sum() + np.trace(c1) + np.trace(c2.numpy()) - 2 * np.trace(covmean).real)
    assert frechet_distance(x, mix) == pytest.approx(dense, rel=1e-5)
    assert float(mix.trace_cov()) == pytest.approx(float(torch.trace(c2)), rel=1e-10)


def test_nll_is_the_pixel_space_density(small_analytic_prior):
    p = small_analytic_prior
    mix = p.mixture("a red square")
    z = p.sample("a red square", 8, torch.Generator().manual_seed(0))
    # density of the pixel image x = scale z + shift: p_x(x) = p_z(z) / scale^D
    nats = -mix.log_prob(z.reshape(8, -1).double()).mean() + mix.dim * math.log(p.scale)
    assert nll_bits_per_dim(z, mix, p.scale) == pytest.approx(float(nats / (mix.dim * math.log(2)) + math.log2(127.5)))
    assert nll_bits_per_dim(torch.randn_like(z), mix, p.scale) > nll_bits_per_dim(z, mix, p.scale) + 1


def test_expected_energies_match_monte_carlo(analytic_prior):
    p = analytic_prior
    for prompt in ("a blue cross", "a circle, blurry, oversaturated"):
        mix = p.mixture(prompt)
        z = p.sample(prompt, 4096, torch.Generator().manual_seed(0)).double()
        mc_hf = float((highpass(z) ** 2).mean())
        assert mix.expected_spatial_energy(LAPLACIAN) == pytest.approx(mc_hf, rel=0.03)
        assert sharpness_ratio(z, mix) == pytest.approx(1.0, abs=0.03)
        assert saturation_ratio(z, mix, p) == pytest.approx(1.0, abs=0.03)


def test_collapse_sharpness_saturation_on_known_sets(analytic_prior):
    p = analytic_prior
    mix = p.mixture("a purple cross")
    true = p.sample("a purple cross", 256, torch.Generator().manual_seed(0))
    mean = mix.mean().float().view(1, *p.sample_shape).expand(16, -1, -1, -1)
    assert collapse_score(true, mix) < 0.1
    assert collapse_score(mean, mix) == pytest.approx(1.0)
    assert collapse_score(mean + 0.5, mix) == pytest.approx(1.0)  # blind to a common shift
    assert sharpness_ratio(mean, mix) < 0.2  # the mean is a blurred average
    gray = p.to_pixels(true).mean(1, keepdim=True)
    vivid = p.from_pixels(gray + 1.5 * (p.to_pixels(true) - gray))
    assert saturation_ratio(vivid, mix, p) == pytest.approx(2.25 * saturation_ratio(true, mix, p), rel=1e-6)


def test_classifier_names_the_concept_of_exact_samples_and_renders(analytic_prior):
    p = analytic_prior
    classifier = classifier_for(p)
    g = torch.Generator().manual_seed(0)
    correct = renders_correct = total = 0
    for shape in SHAPES:
        for color in COLORS:
            z = p.sample_concept(shape, color, 8, g)
            pred = classifier.classify(z)
            correct += sum(c == (shape, color) and bool(r) for c, r in zip(pred.concepts(), pred.recognizable))
            render = p.from_pixels(render_shapes(shape, color, 8, p.config.size, g))
            renders_correct += sum(c == (shape, color) for c in classifier.classify(render).concepts())
            total += 8
    assert correct / total >= 0.95 and renders_correct / total >= 0.97
    # the blurred average of a prompt's images and a flat image have nearest templates too, but are not recognizable
    blob = p.mixture("a red circle").mean().float().view(1, *p.sample_shape)
    flat = torch.zeros(1, *p.sample_shape)
    assert not bool(classifier.classify(torch.cat([blob, flat])).recognizable.any())
    # a dimmer or an over-saturated rendering still shows its concept (what CFG 1 vs 7.5 changes), a faint one does not
    render = render_shapes("circle", "red", 16, p.config.size, torch.Generator().manual_seed(3))
    b = torch.tensor(2 * BACKGROUND - 1)
    for contrast, shown in ((0.6, True), (1.8, True), (0.15, False)):
        pred = classifier.classify(p.from_pixels(b + contrast * (render - b)))
        hits = [c == ("circle", "red") and bool(r) for c, r in zip(pred.concepts(), pred.recognizable)]
        assert (sum(hits) / len(hits) >= 0.9) if shown else (sum(hits) / len(hits) <= 0.1), (contrast, hits)


def test_classifier_sees_the_concept_as_a_person_does(analytic_prior):
    """Recognizable by margins (sdbridge/metrics/classify.py): what an optimizer leaves (soft edges, mottling, a red
    off the world's red) is still a red circle; two superposed circles, a circle beside a square, a cyan or orange
    disc (halfway between two of the world's colors), a bright flat haze or noise are not, although each has a
    nearest template and color."""
    from sdbridge.metrics.classify import MARGIN
    from sdbridge.priors.vocabulary import blur
    from sdbridge.priors.world import render_masks

    p = analytic_prior
    classifier = classifier_for(p)
    size, n = p.config.size, 16
    g = torch.Generator().manual_seed(5)
    b = torch.tensor(2 * BACKGROUND - 1, dtype=torch.float64)

    def offset(rgb, masks):  # pixel-unit color offset of masks painted in rgb (in [0, 1])
        d = 2 * torch.tensor(rgb, dtype=torch.float64) - 1 - b
        return d.view(1, 3, 1) * masks.double().view(masks.shape[0], 1, -1)

    def smooth(v, px=1.0):
        return blur(v.reshape(-1, 1, size, size), px).reshape(v.shape)

    circle = offset(COLORS["red"], render_masks("circle", n, size, g))  # (n, 3, P)
    red = torch.tensor(COLORS["red"], dtype=torch.float64)
    texture = smooth(torch.randn(n, 1, size * size, generator=g, dtype=torch.float64))
    texture = texture / texture.std()  # smooth, unit-variance, one value per pixel
    contrast = (2 * red - 1 - b).view(1, 3, 1)

    def read(name, off):
        pred = classifier.classify(p.from_pixels((b + off).view(n, 3, size, size)).float())
        hits = sum(c == ("circle", "red") and bool(r) for c, r in zip(pred.concepts(), pred.recognizable)) / n
        return hits, pred

    shown = {
        "blurred by 1 px": smooth(circle),
        # the disc's brightness mottled by 15% and a gray texture at 5% of its contrast around it (heavier mottling,
        # 30% and 10%, loses the margin: the rule is conservative there; SDS's discs keep margins of 1.5-1.9)
        "mottled": circle * (1 + 0.15 * texture) + 0.05 * contrast.norm() / math.sqrt(3) * texture,
        "orange-red": offset((0.90, 0.30, 0.10), render_masks("circle", n, size, torch.Generator().manual_seed(5))),
    }
    for name, off in shown.items():
        hits, pred = read(name, off)
        assert hits >= 0.8, (name, hits, pred.margin, pred.color_margin, pred.explained)
    square = offset(COLORS["white"], render_masks("square", n, size, g))
    hidden = {
        "two circles": circle + F.pad(circle.view(n, 3, size, size), (0, 0, 6, 0))[:, :, :size].reshape(circle.shape),
        "circle beside a square": circle + square,
        "cyan circle": offset((0.12, 0.80, 0.80), render_masks("circle", n, size, g)),
        "orange circle": offset((0.95, 0.50, 0.10), render_masks("circle", n, size, g)),
    }
    for name, off in hidden.items():  # (a square hidden mostly behind the circle may pass: at most 2 in 16)
        pred = read(name, off)[1]
        assert float(pred.recognizable.double().mean()) <= 0.125, (name, pred.margin, pred.explained)
    haze = b + (0.5 + torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)).expand(n, 3, size, size)
    for flat in (haze, torch.randn(n, *p.sample_shape, generator=g, dtype=torch.float64)):
        pred = classifier.classify(p.from_pixels(flat).float() if flat is haze else flat.float())
        assert not bool(pred.recognizable.any()) and float(pred.margin.max()) < MARGIN, pred.margin
    assert classifier.classify(torch.zeros(0, *p.sample_shape)).shape == []
    # nearly all unconditional exact samples are recognizable (measured: 99.1% of 1,024)
    samples = p.sample("", 512, torch.Generator().manual_seed(0))
    assert float(classifier.classify(samples).recognizable.double().mean()) >= 0.97


def test_exact_metrics_groups_by_prompt(analytic_prior):
    p = analytic_prior
    x = torch.cat([p.sample("a red circle", 4), p.sample("a blue square", 3), p.sample("a green ring", 1)])
    prompts = ["a red circle"] * 4 + ["a blue square"] * 3 + ["a green ring"]
    m = exact_metrics(p, x, prompts)
    assert list(m["per_prompt"]) == ["a red circle", "a blue square", "a green ring"]
    assert m["per_prompt"]["a blue square"]["n"] == 3
    assert "fd" not in m["per_prompt"]["a green ring"] and "nll_bpd" in m["per_prompt"]["a green ring"]
    assert {"adherence", "recognizable", "saturation"} <= set(m["mean"])
    assert m["mean"]["fd"] == pytest.approx((m["per_prompt"]["a red circle"]["fd"]
                                             + m["per_prompt"]["a blue square"]["fd"]) / 2)


def test_moments_and_energies_with_the_generic_component(small_analytic_prior):
    """The exact moments, Frechet distance and expected energies include the generic component (``prior.
    generic_share``): dense formulas and Monte Carlo, with the generic Gaussian holding most of the mass."""
    p = AnalyticPrior(dataclasses.replace(small_analytic_prior.config, generic_share=0.7, generic_rank=64))
    mix = p.mixture("a circle, hazy")
    m2, c2 = _dense_moments(mix)
    torch.testing.assert_close(mix.mean(), m2)
    probe = torch.randn(3, mix.dim, dtype=torch.float64)
    torch.testing.assert_close(mix.cov_apply(probe), probe @ c2)
    assert float(mix.trace_cov()) == pytest.approx(float(torch.trace(c2)), rel=1e-10)
    z = p.sample("a circle, hazy", 8192, torch.Generator().manual_seed(0)).double()
    assert float((highpass(z) ** 2).mean()) == pytest.approx(mix.expected_spatial_energy(LAPLACIAN), rel=0.03)
    assert saturation_ratio(z, mix, p) == pytest.approx(1.0, abs=0.03)


def test_classifier_smoothing_scales_with_the_image_size(world_cache):
    """The classifier smooths by the same fraction of the image at every size (1 px at 32 px, 0.5 px at 16 px, the
    size of ``prior=learned``): with 1 px at 16 px a triangle or a square blurs toward a disc and only 82% of the
    unconditional exact samples were recognizable. Measured with 0.5 px: 94.5% of 1,024 (small rotated squares are
    the hard case at 16 px: 81% of them), and 95.1% of the samples of each concept named right."""
    from sdbridge.metrics.classify import ConceptClassifier
    from sdbridge.priors.analytic import AnalyticConfig

    small = AnalyticPrior(AnalyticConfig(size=16, cache_dir=str(world_cache), device="cpu"))
    classifier = ConceptClassifier(small)
    assert classifier.smoothing == pytest.approx(0.5)
    samples = small.sample("", 512, torch.Generator().manual_seed(0))
    assert float(classifier.classify(samples).recognizable.double().mean()) >= 0.93
