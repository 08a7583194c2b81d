"""Nearest-template classifier of the exact world: which concept (shape, color) does an image show?

A template is a held-out rendering mask of a shape (``TEMPLATES_PER_SHAPE`` per shape, rendered from a seed the world
is never fit with). An image ``x`` (pixel units, background ``b`` removed: ``y = x - b 1``) is fit by every template
``m_j`` with a free color offset ``v`` (one amplitude per channel), which leaves the residual energy

    r_j = |y|^2 - sum_ch (y_ch . m_j)^2 / |m_j|^2,

so a disc whose red is off the world's red direction, dimmer or brighter, is judged by its shape alone. The image
gets the shape of its best template and the world color nearest (by angle) to that template's fitted ``v``. Images
and templates are first smoothed by a Gaussian of ``SMOOTHING_PX`` at 32 px, the same fraction of the image at other
sizes (the world's sensor noise would otherwise dominate the distances; 1 px at 16 px would blur a triangle into a
disc: measured, 82% of 16 px unconditional exact samples recognizable with 1 px, 94.5% with 0.5 px).

An image is **recognizable** when its shape wins clearly, its color is one of the world's, and nothing else is in
it: the best template of its shape fits at least ``MARGIN`` times better (RMS residual) than the best template of any
other shape; the fitted color is at most ``COLOR_MARGIN`` times as far (in angle) from the named color as from the
next one, at ``MIN_CONTRAST`` of the renderings' contrast or more; and the template explains at least
``MIN_EXPLAINED`` of the image's energy. Margins, not a distance: an optimized image is never as close to a template
as an exact sample (soft edges, leftover texture, a red that is not exactly the world's), yet a person still sees a
red disc in it, and so do the margins: an exact red circle blurred by 1 px or mottled keeps a shape margin of
1.5-3, while two superposed circles, a disc inside ring outlines, a blurred average of many positions, a flat haze
or noise fit two shapes about equally (1.0-1.2); a cyan or orange disc is halfway between two colors, and a circle
beside a square leaves much of the image unexplained. Measured (tests/unit/test_exact_metrics.py): 99% of the default
world's unconditional exact samples are recognizable; SDS's soft red discs on it are, Bridge's ring outlines are not
(experiments/exact/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdbridge.priors.analytic import AnalyticPrior
from sdbridge.priors.vocabulary import blur
from sdbridge.priors.world import COLORS, SHAPES, color_vectors, render_masks

TEMPLATES_PER_SHAPE = 3000
TEMPLATE_SEED = 1_000_003  # plus the world's seed
SMOOTHING_PX = 1.0  # at SMOOTHING_SIZE px; scaled with the image size
SMOOTHING_SIZE = 32
MARGIN = 1.25  # RMS residual of the best other shape / of the named shape, at least
COLOR_MARGIN = 0.5  # angle to the named color / angle to the next color, at most (exact samples: < 0.1)
MIN_CONTRAST = 1 / 3  # fitted contrast along the named color relative to the renderings', at least
MIN_EXPLAINED = 0.8  # share of the image's (smoothed, background-free) energy the best template explains, at least


@dataclass
class Prediction:
    shape: list[str]
    color: list[str]
    margin: torch.Tensor  # (n,) RMS residual of the best other shape's template / of the best template
    color_margin: torch.Tensor  # (n,) angle of the fitted color to the named color / to the next color
    contrast: torch.Tensor  # (n,) fitted contrast along the named color, relative to the renderings'
    explained: torch.Tensor  # (n,) share of the image's energy the best template explains
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
        self.smoothing = SMOOTHING_PX * self.size / SMOOTHING_SIZE
        self.templates = self._smooth(templates.reshape(-1, templates.shape[2])).float()  # (6 T, P)
        self.b, self.d = color_vectors()
        self.directions = self.d / self.d.norm(dim=1, keepdim=True)
        self.t2 = (self.templates.double() ** 2).sum(1)  # (6 T,)

    def _fit(self, part: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Shape, color and the four recognizability measures of each image of ``part`` (module docstring)."""
        n, rows = part.shape[0], torch.arange(part.shape[0])
        x = self.prior.to_pixels(part.to(self.prior.shift)).cpu().reshape(n, 3, self.size * self.size)
        y = self._smooth(x - self.b.view(1, 3, 1))
        ym = torch.einsum("nkp,tp->nkt", y.float(), self.templates).double()  # (n, 3, 6 T), float32 products
        energy = (y**2).sum((1, 2))
        residual = energy.view(-1, 1) - (ym**2).sum(1) / self.t2  # (n, 6 T)
        per_shape, which = residual.view(n, len(SHAPES), self.num_templates).min(2)  # best template of each shape
        ranked, order = per_shape.sort(1)
        shape = order[:, 0]
        j = shape * self.num_templates + which[rows, shape]
        v = ym[rows, :, j] / self.t2[j].view(-1, 1)  # (n, 3): the best template's fitted color offset
        cosines = (v @ self.directions.T) / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        angles, colors = torch.acos(cosines.clamp(-1, 1)).sort(1)
        color = colors[:, 0]
        contrast = (v * self.directions[color]).sum(1) / self.d[color].norm(dim=1)
        best = ranked[:, 0].clamp(min=1e-12)
        margin = (ranked[:, 1].clamp(min=0) / best).sqrt()
        explained = 1 - best / energy.clamp(min=1e-12)
        return shape, color, margin, angles[:, 0] / angles[:, 1], contrast, explained

    def _smooth(self, v: torch.Tensor) -> torch.Tensor:
        shape = v.shape
        return blur(v.reshape(-1, 1, self.size, self.size), self.smoothing).reshape(shape)

    @torch.no_grad()
    def classify(self, z: torch.Tensor) -> Prediction:
        shape, color, margin, color_margin, contrast, explained = (
            torch.cat(v) for v in zip(*map(self._fit, z.split(self.chunk))))
        colors = list(COLORS)
        recognizable = ((margin >= MARGIN) & (color_margin <= COLOR_MARGIN) & (contrast >= MIN_CONTRAST)
                        & (explained >= MIN_EXPLAINED))
        return Prediction([SHAPES[int(i)] for i in shape], [colors[int(i)] for i in color], margin, color_margin,
                          contrast, explained, recognizable)

    def adherence(self, z: torch.Tensor, concepts: list[tuple[str, str]]) -> tuple[float, float]:
        """``(adherence, recognizable)``: the share of images that show one of ``concepts`` recognizably, and the
        share that are recognizable at all."""
        pred = self.classify(z)
        allowed = set(concepts)
        hits = [c in allowed and bool(r) for c, r in zip(pred.concepts(), pred.recognizable)]
        return sum(hits) / max(1, len(hits)), float(pred.recognizable.double().mean())


def classifier_for(prior: AnalyticPrior) -> ConceptClassifier:
    """The prior's classifier, built on first use (templates ~1 s) and kept on the prior."""
    cached = getattr(prior, "_concept_classifier", None)
    if cached is None:
        cached = ConceptClassifier(prior)
        object.__setattr__(prior, "_concept_classifier", cached)
    return cached
