"""Nearest-template classifier of the exact world: which concept (shape, color) does an image show?

A template is a held-out rendering mask of a shape (``TEMPLATES_PER_SHAPE`` per shape, rendered from a seed the world
is never fit with); with the
world's color factorization an image ``x`` (pixel units) is compared with every template ``m_j`` in every color c, at
the best contrast ``alpha`` within ``CONTRAST_RANGE`` (a dimmer or an over-saturated red circle is still a red circle),

    dist^2(j, c) = min_alpha |y - alpha d_c (x) m_j|^2 = |y|^2 - 2 alpha p + alpha^2 q,   y = x - b 1,
    p = sum_ch d_c[ch] (y_ch . m_j),   q = |d_c|^2 |m_j|^2,   alpha = clamp(p / q, CONTRAST_RANGE),

and the image gets the concept of its nearest (template, color). Images and templates are first smoothed by a
Gaussian of ``SMOOTHING_PX`` (the world's sensor noise would otherwise dominate the distance). An image is **recognizable** when its distance to
that template, in mask units (RMS over pixels of the mismatch divided by the fitted contrast ``alpha |d_c|``, so bright
and dark colors are judged alike), is within what exact samples of the world reach (the 99th percentile over 1,024
unconditional exact samples, seed 0): a blob or a colored haze has a nearest template too, but is far from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdbridge.files import write_text
from sdbridge.priors.analytic import AnalyticPrior
from sdbridge.priors.vocabulary import blur
from sdbridge.priors.world import COLORS, SHAPES, color_vectors, render_masks

TEMPLATES_PER_SHAPE = 3000
TEMPLATE_SEED = 1_000_003  # plus the world's seed
SMOOTHING_PX = 1.0
CALIBRATION_SAMPLES = 1024
CALIBRATION_QUANTILE = 0.99
CONTRAST_RANGE = (1 / 3, 3.0)  # contrasts (relative to the renderings') at which an image still shows the concept


@dataclass
class Prediction:
    shape: list[str]
    color: list[str]
    distance: torch.Tensor  # (n,) distance to the nearest template, mask units (RMS mismatch / color contrast)
    recognizable: torch.Tensor  # (n,) bool

    def concepts(self) -> list[tuple[str, str]]:
        return list(zip(self.shape, self.color))


class ConceptClassifier:
    """``classify(z)`` for model-space images of ``prior`` (built once per prior: :func:`classifier_for`)."""

    def __init__(self, prior: AnalyticPrior, chunk: int = 256):
        self.prior = prior
        self.chunk = chunk
        gen = torch.Generator().manual_seed(prior.config.seed + TEMPLATE_SEED)
        templates = torch.stack([render_masks(shape, TEMPLATES_PER_SHAPE, prior.config.size, gen) for shape in SHAPES])
        self.num_templates = templates.shape[1]
        self.size = prior.config.size
        self.templates = self._smooth(templates.reshape(-1, templates.shape[2])).float()  # (6 T, P)
        self.b, self.d = color_vectors()
        self.t2 = (self.templates.double() ** 2).sum(1)  # (6 T,)
        self.threshold = self._calibrated_threshold()

    def _calibrated_threshold(self) -> float:
        """The 99th percentile of the nearest-template distance of unconditional exact samples: computed once per
        world and text model (~10 s) and kept beside the world's cache, written atomically."""
        config = {k: v for k, v in asdict(self.prior.config).items() if k not in ("device", "dtype", "cache_dir")}
        blob = json.dumps({"world": self.prior.config.world_spec().key(), "prior": config, "version": 1,
                           "classifier": [TEMPLATES_PER_SHAPE, TEMPLATE_SEED, SMOOTHING_PX, CALIBRATION_SAMPLES,
                                          CALIBRATION_QUANTILE, list(CONTRAST_RANGE)]}, sort_keys=True)
        path = Path(os.path.expanduser(self.prior.config.cache_dir)) / \
            f"classifier-{hashlib.sha1(blob.encode()).hexdigest()[:12]}.json"
        try:
            return float(json.loads(path.read_text())["threshold"])
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: calibrate (again)
            pass
        z = self.prior.sample("", CALIBRATION_SAMPLES, torch.Generator().manual_seed(0))
        threshold = float(torch.quantile(self._nearest(z)[1], CALIBRATION_QUANTILE))
        try:
            write_text(path, json.dumps({"threshold": threshold, "key": json.loads(blob)}))
        except OSError:  # a read-only cache only costs the calibration next time
            pass
        return threshold

    def _nearest(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index (template * 6 + color) and RMS distance of the nearest (template, color) of each image."""
        idx, dist = [], []
        for part in z.split(self.chunk):
            x = self.prior.to_pixels(part.to(self.prior.shift)).cpu().reshape(part.shape[0], 3, -1)
            y = self._smooth(x - self.b.view(1, 3, 1))
            ym = torch.einsum("nkp,tp->nkt", y.float(), self.templates).double()  # (n, 3, 6 T), float32 products
            proj = torch.einsum("nkt,ck->ntc", ym, self.d)  # (n, 6 T, 6 colors)
            q = self.t2.view(1, -1, 1) * (self.d**2).sum(1).view(1, 1, -1)
            alpha = (proj / q).clamp(*CONTRAST_RANGE)
            d2 = (y**2).sum((1, 2)).view(-1, 1, 1) - 2 * alpha * proj + alpha**2 * q
            best, arg = d2.flatten(1).min(1)
            contrast2 = (self.d**2).sum(1)[arg % 6] * alpha.flatten(1).gather(1, arg.view(-1, 1)).flatten() ** 2
            idx.append(arg)
            dist.append((best.clamp(min=0) / contrast2 / y.shape[2]).sqrt())
        return torch.cat(idx), torch.cat(dist)

    def _smooth(self, v: torch.Tensor) -> torch.Tensor:
        shape = v.shape
        return blur(v.reshape(-1, 1, self.size, self.size), SMOOTHING_PX).reshape(shape)

    @torch.no_grad()
    def classify(self, z: torch.Tensor) -> Prediction:
        idx, dist = self._nearest(z)
        colors, shapes = list(COLORS), [SHAPES[int(i) // (6 * self.num_templates)] for i in idx]
        return Prediction(shapes, [colors[int(i) % 6] for i in idx], dist, dist <= self.threshold)

    def adherence(self, z: torch.Tensor, concepts: list[tuple[str, str]]) -> tuple[float, float]:
        """``(adherence, recognizable)``: the share of images that show one of ``concepts`` recognizably, and the
        share that are recognizable at all."""
        pred = self.classify(z)
        allowed = set(concepts)
        hits = [c in allowed and bool(r) for c, r in zip(pred.concepts(), pred.recognizable)]
        return sum(hits) / max(1, len(hits)), float(pred.recognizable.double().mean())


def classifier_for(prior: AnalyticPrior) -> ConceptClassifier:
    """The prior's classifier, built on first use (templates ~1 s; the calibration ~10 s the first time for a world and
    text model, then read from the cache) and kept on the prior."""
    cached = getattr(prior, "_concept_classifier", None)
    if cached is None:
        cached = ConceptClassifier(prior)
        object.__setattr__(prior, "_concept_classifier", cached)
    return cached
