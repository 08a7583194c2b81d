"""Exact metrics against the exact prior's true distribution of a prompt.

All metrics take images in model units (x0 = z, ``(n, 3, S, S)``) and a prompt's
:class:`~sdbridge.priors.analytic.Mixture` p = sum_k pi_k N(m_k, Sigma_k). Let X be the n images as rows (n, D).

* **Frechet distance** (FD, the FID formula in model space, no feature network) between the images' Gaussian fit
  (mean m1, covariance C1 with n - 1 normalization) and p's exact mean m2 and covariance C2:
  ``FD = |m1 - m2|^2 + tr C1 + tr C2 - 2 tr (C1^1/2 C2 C1^1/2)^1/2``. The last trace equals the sum of square roots of
  the eigenvalues of ``Xc C2 Xc^T / (n - 1)`` (n x n, Xc the centered images), so no D x D matrix is ever formed.
  Lower is better; exact samples score above 0 only through the finite-sample bias.
* **NLL** in bits per dimension of the *pixel* image (``x = scale z + shift`` in [-1, 1]) under p at t = 0:
  ``(-log p(z) + D log scale) / (D ln 2) + log2(127.5)``, the usual 8-bit equivalent. Lower is better.
* **Collapse score**: ``max(0, 1 - sqrt(tr C1 / tr C2))``: 0 for a set as diverse as the truth, 1 when every image
  is the same image. Measured around the set's own centre, so a common shift (over-saturation) does not count.
* **Sharpness ratio**: high-frequency energy (mean squared response to the 3x3 Laplacian, circular padding) of the
  images divided by its exact expectation under p. 1 matches the truth; < 1 is over-smoothed, > 1 noisier.
* **Saturation ratio**: mean squared chroma (each pixel's RGB minus its gray level, pixel units) divided by its exact
  expectation under p. 1 matches the truth; > 1 is over-saturated.
* **Adherence** / **recognizable**: the share of images that the nearest-template classifier
  (``sdbridge/metrics/classify.py``) reads as one of the prompt's concepts, recognizably / that are recognizable at all
  (the named shape fits clearly better than any other shape, in a color at a third of the renderings' contrast or
  more: a soft or textured red disc counts, superposed outlines, a haze or noise do not).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F

from sdbridge.metrics.classify import classifier_for
from sdbridge.priors.analytic import AnalyticPrior, Mixture

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)


def _rows(images: torch.Tensor, mix: Mixture) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).to(mix.sets[0].beta)


def frechet_distance(images: torch.Tensor, mix: Mixture) -> float:
    X = _rows(images, mix)
    n = X.shape[0]
    if n < 2:
        raise ValueError("the Frechet distance needs at least 2 images")
    m1 = X.mean(0)
    Xc = (X - m1) / math.sqrt(n - 1)
    tr_c1 = (Xc**2).sum()
    M = mix.cov_apply(Xc) @ Xc.T
    eig = torch.linalg.eigvalsh(0.5 * (M + M.T)).clamp(min=0)
    fd = ((m1 - mix.mean()) ** 2).sum() + tr_c1 + mix.trace_cov() - 2 * eig.sqrt().sum()
    return float(fd)


def nll_bits_per_dim(images: torch.Tensor, mix: Mixture, scale: float) -> float:
    X = _rows(images, mix)
    nats = (-mix.log_prob(X)).mean() + mix.dim * math.log(scale)
    return float(nats / (mix.dim * math.log(2)) + math.log2(127.5))


def collapse_score(images: torch.Tensor, mix: Mixture) -> float:
    X = _rows(images, mix)
    if X.shape[0] < 2:
        raise ValueError("the collapse score needs at least 2 images")
    spread = ((X - X.mean(0)) ** 2).sum() / (X.shape[0] - 1)
    return float((1 - (spread / mix.trace_cov()).sqrt()).clamp(min=0))


def rms(x: torch.Tensor) -> float:
    """Root mean square over all entries, accumulated in float64 (the experiments' "RMS per pixel")."""
    return float(x.double().pow(2).mean().sqrt())


def highpass(images: torch.Tensor) -> torch.Tensor:
    c = images.shape[1]
    k = LAPLACIAN.to(images).view(1, 1, 3, 3).repeat(c, 1, 1, 1)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="circular"), k, groups=c)


def sharpness_ratio(images: torch.Tensor, mix: Mixture) -> float:
    x = images.to(mix.sets[0].beta)
    energy = (highpass(x) ** 2).flatten(1).mean(1).mean()
    return float(energy / mix.expected_spatial_energy(LAPLACIAN))


def saturation_ratio(images: torch.Tensor, mix: Mixture, prior: AnalyticPrior) -> float:
    x = prior.to_pixels(images.to(mix.sets[0].beta))
    chroma = ((x - x.mean(1, keepdim=True)) ** 2).sum(1).mean()
    return float(chroma / mix.expected_chroma_energy(prior.shift.to(x), prior.scale))


#: name -> function(images, mixture, prior)
METRICS = OrderedDict(
    fd=lambda x, mix, prior: frechet_distance(x, mix),
    nll_bpd=lambda x, mix, prior: nll_bits_per_dim(x, mix, prior.scale),
    collapse=lambda x, mix, prior: collapse_score(x, mix),
    sharpness=lambda x, mix, prior: sharpness_ratio(x, mix),
    saturation=lambda x, mix, prior: saturation_ratio(x, mix, prior),
)
#: from the nearest-template classifier, one pass for both
CLASSIFIER_METRICS = ("adherence", "recognizable")
ALL_METRICS = (*METRICS, *CLASSIFIER_METRICS)

#: metrics defined for a single image (the others compare sets)
SINGLE_IMAGE = ("nll_bpd", "sharpness", "saturation", "adherence", "recognizable")


@torch.no_grad()
def exact_metrics(prior: AnalyticPrior, x0: torch.Tensor, prompts: Sequence[str]) -> dict:
    """Metrics per prompt (images grouped by their prompt) and their mean over prompts.

    Returns ``{"per_prompt": {prompt: {metric: value, "n": count}}, "mean": {metric: value}}``.
    """
    if len(prompts) != x0.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {x0.shape[0]} images")
    groups: dict[str, list[int]] = OrderedDict()
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    per_prompt = {}
    for p, rows in groups.items():
        mix = prior.mixture(p)
        imgs = x0[rows]
        values = {name: fn(imgs, mix, prior) for name, fn in METRICS.items()
                  if len(rows) >= 2 or name in SINGLE_IMAGE}
        values.update(zip(CLASSIFIER_METRICS, classifier_for(prior).adherence(imgs, mix.concepts)))
        per_prompt[p] = {**values, "n": len(rows)}
    mean = {
        name: sum(v[name] for v in per_prompt.values() if name in v) / max(1, sum(name in v for v in per_prompt.values()))
        for name in ALL_METRICS
        if any(name in v for v in per_prompt.values())
    }
    return {"per_prompt": per_prompt, "mean": mean}
