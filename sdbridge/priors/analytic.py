"""The exact prior: a miniature latent text-to-image model whose denoiser is known in closed form.

**World** (``sdbridge/priors/world.py``): one sharp shape of one color per image; each concept (shape, color) is a
mixture of low-rank Gaussians over clusters of its renderings (factor analyzers along the rendering manifold).
**Text** (``sdbridge/priors/vocabulary.py``) tilts one shared mixture over all 36 concepts (``text_adherence``),
gives the concepts it names their full color contrast (the others keep ``1 - text_contrast`` of it), and modifier
words mix in corrupted copies (``modifier_weight``). **Model space**: like SD's scaled latents, the model
works on ``z = (x - shift) / scale`` where x is the image in [-1, 1] and ``shift`` (per channel) and ``scale`` are the
exact mean and RMS deviation of the data (all 36 concepts equally likely, full contrast), so ``randn`` samples are in
scale with the data.

Every component is ``N(m_k, U_k diag(l_k) U_k^T + s^2 I)`` in model space with the color x geometry structure

    m_(g,c) = beta 1 + a_(g,c) delta_c (x) mu_g,     U_(g,c) = dhat_c (x) Q_g,     l_(g,c) = |delta_c|^2 lam_g

(``beta`` the background, ``delta_c`` color c minus background, both in model units; ``mu_g, Q_g, lam_g`` a
geometry component over pixels; ``a`` the prompt's color amplitude of the component, see ``contrast_amplitudes``).

Why the amplitude: re-weighting alone makes ``eps_cond - eps_uncond`` vanish wherever the posterior has settled on
one component (measured: ~0 for t <= 500), so CFG would act only at the noisiest steps. In Stable Diffusion the
CFG update has a part parallel to the prediction at every step, and that part is what over-saturates at high guidance
scales (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models").
Here the prompt's components are slightly more contrasted than the unconditional ones, so CFG scale w gives a settled
component the contrast ``1 - b + w b``: the same parallel, saturating push, exactly. Noising with SD 2.1's schedule keeps each Gaussian:
``N(sqrt(a) m_k, a U diag(l) U^T + c I)``, ``c = a s^2 + 1 - a``, and the exact epsilon is
``eps(x_t, t) = -sqrt(1 - a) grad log p_t(x_t)``. By Woodbury,

    Sigma_k^-1 d = (d - U_k (g_k * U_k^T d)) / c,       g_k = a l_k / (a l_k + c)
    log det Sigma_k = D log c + sum log(1 + a l_k / c)

and because of the factorization the projections ``U_k^T x`` of all 6 colors of a geometry component come from
three per-channel projections ``x_ch Q_g``: one evaluation costs O(B 3 P G r) for G geometry components of rank r
(P pixels), shared by every conditioning of the call (text only changes the weights). Responsibilities use
log-sum-exp in float64, which keeps t near 0 (small c) and near 999 stable.

**Generic component** (``prior.generic_share``, off by default): every prompt can also hold one shared Gaussian with
the unconditional data's mean and covariance (``GenericGaussian``). Off the data it takes the posterior (measured:
responsibility 1.0 for t <= 200 on the blurred average of a prompt's images), so there the exact denoiser is one broad
Gaussian's (a Wiener filter) rather than a pull toward the nearest stored concept; and since every prompt holds the
same one, CFG cancels there and acts where the prompt's concepts have mass.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from sdbridge.priors.base import DiffusionPrior, PriorConfig, TextEmbedding, resolve_device
from sdbridge.priors.vocabulary import MODIFIERS, Modifier, ParsedPrompt, parse_prompt, saturation
from sdbridge.priors.world import COLORS, SHAPES, GeometryModel, World, WorldSpec, color_vectors, load_world
from sdbridge.rng import SampleGenerators
from sdbridge.registry import builds


#: Posterior mass below which a component's low-rank term is left out of the score (it would change eps by less than
#: this share; float32 resolves 6e-8): components with less mass on every row of a batch skip the back-projection.
NEGLIGIBLE_MASS = 1e-12

#: noise levels whose shrinkage a component set keeps (``ComponentSet._shrinkage_at``): every timestep of the
#: 1000-step schedule, ~130 kB each for the default world's clean set
SHRINK_CACHE_LEVELS = 1024


@dataclass
class AnalyticConfig(PriorConfig):
    """``prior=analytic``: the exact world (model space = affinely scaled pixels, ``3 x size x size``)."""

    size: int = 32  # S: images are 3 x S x S (16..64)
    clusters: int = 64  # geometry components per shape (on average)
    rank: int = 12  # principal directions per component
    coarse_clusters: int = 16  # components per shape of the corrupted copies
    coarse_rank: int = 8
    renders_per_cluster: int = 80
    #: > 0: the translation-equivariant world (``sdbridge/priors/world.py``), this many templates per shape on
    #: average, each at every integer shift (49 at size 32); prior.clusters then only sets how many renders the
    #: coarse copies are fitted to. Off: 6.4x the eps cost, and no method adheres more (experiments/exact/README.md)
    templates: int = 0
    #: > 0: every component also varies in contrast (lighting), ``m -> (1 + a) m`` with ``a ~ N(0, contrast_std^2)``
    #: to first order: its mean becomes one more direction of its basis. Off in the measured world: it stops dim
    #: discs reading as rings, but its table is not re-measured (experiments/exact/README.md, 2026-12-04)
    contrast_std: float = 0.0
    #: non-empty: every component also comes at these discrete contrasts (lighting), equally likely, ``m -> l m``
    #: with the variation scaled alike. Unlike ``contrast_std`` it is bounded above (a brighter-than-rendered image is
    #: off the data, as in SD, whose pixels clip) and a level is too far from the next to absorb ``text_contrast``;
    #: each component is evaluated once per level. Off in the measured world (experiments/exact/README.md, 2026-12-05)
    contrast_levels: list[float] = field(default_factory=list)
    noise_floor: float = 0.2  # s: isotropic std of every component, model units (sensor noise; keeps eps O(1))
    precision: str = "mixed"  # "float64": all in float64; "mixed": the projections in float32 (measured: README)
    text_adherence: float = 0.9  # share of a prompt's mass on the concepts it names
    text_contrast: float = 0.03  # b: color contrast a concept loses when the prompt does not name it (CFG's parallel part)
    text_pull: float = 0.05  # k: how far a prompt moves every component toward the nearest one of a named shape
    #: what ``text_contrast`` takes from the concepts a prompt does not name: "contrast" (their whole color offset
    #: ``d_c``, as a scalar amplitude) or "chroma" (only its chroma, the luminance offset kept). With contrast variation
    #: (``contrast_std``) lighting scales the whole offset, so "contrast" is absorbed at small t and CFG vanishes on
    #: settled images; "chroma" differs from lighting in color and is not (experiments/exact/README.md, 2026-12-05).
    #: "chroma" gives each set 6 colors per contrast level (``make run``: 1.38x the default's wall time, 2026-12-05)
    text_contrast_on: str = "contrast"
    modifier_weight: float = 1.0  # mass of each modifier word's corrupted copy, relative to the clean distribution
    degraded_share: float = 0.0  # share of degraded images (degraded_words' copies) in the unconditional distribution
    degraded_words: list[str] = field(default_factory=lambda: ["blurry", "low contrast"])
    #: every prompt's mass on one shared generic-image Gaussian, which makes the exact denoiser local off the data (a
    #: trained network's is); 0 (off) in the measured world until the exact table is re-measured with it (README)
    generic_share: float = 0.0
    generic_rank: int = 256  # principal directions of the generic Gaussian's covariance (the rest isotropic)
    seed: int = 0  # the world's seed (not the run's)
    cache_dir: str = "~/.cache/sdbridge/world"

    def __post_init__(self) -> None:
        self.world_spec().check()
        if not 0 < self.noise_floor < 1:
            raise ValueError(f"prior.noise_floor={self.noise_floor} must be in (0, 1) (model units)")
        if not 1 / 36 < self.text_adherence < 1:
            raise ValueError(f"prior.text_adherence={self.text_adherence} must be in (1/36, 1): the share of a prompt's "
                             "mass on the concepts it names (1 would make text select, not tilt)")
        if not 0 <= self.text_contrast < 1:
            raise ValueError(f"prior.text_contrast={self.text_contrast} must be in [0, 1): the share of a concept's color "
                             "contrast it loses when the prompt does not name it")
        if not 0 <= self.text_pull < 1:
            raise ValueError(f"prior.text_pull={self.text_pull} must be in [0, 1): how far a prompt moves every component "
                             "toward the nearest component of a shape it names")
        if not 0 <= self.contrast_std < 1:
            raise ValueError(f"prior.contrast_std={self.contrast_std} must be in [0, 1): the std of each component's "
                             "contrast relative to its mean (0: none)")
        if self.text_contrast_on not in ("contrast", "chroma"):
            raise ValueError(f"prior.text_contrast_on={self.text_contrast_on!r} is not one of ['contrast', 'chroma']")
        if self.contrast_levels:
            levels = list(self.contrast_levels)
            if not all(0 < level <= 1 for level in levels) or len(set(levels)) != len(levels):
                raise ValueError(f"prior.contrast_levels={levels} must be distinct contrasts in (0, 1] (the "
                                 "renderings' is 1)")
            if self.text_contrast_on != "contrast":
                raise ValueError(f"prior.contrast_levels={levels} works with prior.text_contrast_on=contrast, not "
                                 f"{self.text_contrast_on!r} (a level is too far from the next to absorb the text "
                                 "contrast)")
        if self.precision not in ("float64", "mixed"):
            raise ValueError(f"prior.precision={self.precision!r} is not one of ['float64', 'mixed']")
        if not 0 <= self.degraded_share < 1:
            raise ValueError(f"prior.degraded_share={self.degraded_share} must be in [0, 1)")
        unknown = [w for w in self.degraded_words if w not in MODIFIERS]
        if unknown:
            raise ValueError(f"prior.degraded_words: {unknown} are not modifier words; modifiers are {list(MODIFIERS)}")
        if not 0 <= self.generic_share < 1:
            raise ValueError(f"prior.generic_share={self.generic_share} must be in [0, 1): every prompt's mass on the "
                             "generic-image Gaussian")
        if not 1 <= self.generic_rank < 3 * self.size**2:
            raise ValueError(f"prior.generic_rank={self.generic_rank} must be in [1, {3 * self.size**2})")
        if not self.modifier_weight > 0:
            raise ValueError(f"prior.modifier_weight={self.modifier_weight} must be > 0")

    def world_spec(self) -> WorldSpec:
        return WorldSpec(self.size, self.clusters, self.rank, self.coarse_clusters, self.coarse_rank,
                         self.renders_per_cluster, templates=self.templates, seed=self.seed)


def float32_normal(v: torch.Tensor) -> torch.Tensor:
    """``v`` in float32 with its subnormal values (|v| < 1.2e-38, tails of localized components) set to 0.

    A matmul that meets subnormal operands runs at a fraction of its speed on x86 CPUs: 9,418 of the clean basis's
    4.7 M entries made ``x @ Q`` and the back-projection 2.1x slower (3.4 vs 1.6 ms for a batch of 16 images, this
    machine); each such value changes a product by less than 1e-38."""
    out = v.float()
    return out.masked_fill_(out.abs() < torch.finfo(torch.float32).tiny, 0.0)


def to_work(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` in ``like``'s dtype; in float32 without subnormals (posterior weights down to 1e-300, and products of
    small float32 factors, would be subnormal operands of the next matmul: :func:`float32_normal`)."""
    return float32_normal(v) if like.dtype == torch.float32 else v.to(like)


# --------------------------------------------------------------------------------------------- components
@dataclass
class Geometry:
    """Geometry components over pixels, on the prior's device (float64): ``mu`` (G, P), ``Q`` (G, P, r) orthonormal,
    ``lam`` (G, r), ``log_w`` (G,), ``shape`` (G,); with the stacked basis and the constants the score needs."""

    mu: torch.Tensor
    Q: torch.Tensor
    lam: torch.Tensor
    log_w: torch.Tensor
    shape: torch.Tensor
    Q_all: torch.Tensor = field(init=False)  # (P, G r)
    Qtmu: torch.Tensor = field(init=False)  # (G, r)
    mu2: torch.Tensor = field(init=False)  # (G,)
    mu_sum: torch.Tensor = field(init=False)  # (G,)
    Q_all32: torch.Tensor = field(init=False)  # Q_all in float32, for precision="mixed"
    q_sum: torch.Tensor = field(init=False)  # (G r,) column sums of Q_all (of Q_all32 in q_sum32)
    q_sum32: torch.Tensor = field(init=False)
    mu32: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        G, P, r = self.Q.shape
        self.Q_all = self.Q.permute(1, 0, 2).reshape(P, G * r).contiguous()
        self.Q_all32 = float32_normal(self.Q_all)
        self.q_sum, self.q_sum32 = self.Q_all.sum(0), self.Q_all32.sum(0)
        self._mean_terms()

    def _mean_terms(self) -> None:
        self.mu32 = float32_normal(self.mu)
        self.Qtmu = torch.einsum("gpr,gp->gr", self.Q, self.mu)
        self.mu2 = (self.mu**2).sum(1)
        self.mu_sum = self.mu.sum(1)

    def with_mean(self, mu: torch.Tensor) -> "Geometry":
        """The same components (basis, variances, weights: shared tensors) with the means ``mu`` (G, P)."""
        new = copy.copy(self)
        new.mu = mu
        new._mean_terms()
        return new

    def nearest(self, shapes: list[int]) -> torch.Tensor:
        """(G,): for each component the nearest (L2 between means) component whose shape is one of ``shapes`` (itself
        when its own shape is)."""
        allowed = torch.isin(self.shape, torch.tensor(shapes, device=self.shape.device))
        dist = torch.cdist(self.mu, self.mu[allowed])
        idx = allowed.nonzero().flatten()[dist.argmin(1)]
        own = torch.arange(self.num, device=idx.device)
        return torch.where(allowed, own, idx)

    @classmethod
    def from_model(cls, model: GeometryModel, modifier: Modifier | None, size: int, device,
                   contrast_std: float = 0.0) -> "Geometry":
        """The model's components, pushed through the modifier's spatial maps (re-orthonormalized by SVD).
        ``contrast_std`` > 0: each component also varies in contrast, ``m -> (1 + a) m`` with ``a ~ N(0,
        contrast_std^2)`` to first order (one more direction, its mean, in its basis)."""
        mu, V, lam = model.mu.double(), model.V.double(), model.lam.double()
        spatial = modifier is not None and bool(modifier.spatial)
        if contrast_std > 0 or spatial:  # covariance factor (G, P, r'): changed, then re-orthonormalized once
            factor = V * lam.sqrt().unsqueeze(1)
            if contrast_std > 0:
                factor = torch.cat([factor, contrast_std * mu.unsqueeze(2)], 2)
            if spatial:
                G, P, r = factor.shape
                as_img = lambda v: v.reshape(-1, 1, size, size)  # noqa: E731
                mu = modifier.apply_spatial(as_img(mu)).reshape(G, P)
                cols = modifier.apply_spatial(as_img(factor.transpose(1, 2).reshape(G * r, P)))
                factor = cols.reshape(G, r, P).transpose(1, 2)
            V, sv, _ = torch.linalg.svd(factor, full_matrices=False)
            lam = sv**2
        return cls(mu.to(device), V.contiguous().to(device), lam.to(device), model.log_w.double().to(device),
                   model.shape.to(device))

    @property
    def num(self) -> int:
        return int(self.mu.shape[0])

    @property
    def rank(self) -> int:
        return int(self.Q.shape[2])


@dataclass
class ComponentSet:
    """All (geometry g, color c) components of one corruption: geometry, background ``beta`` (3,) and color vectors
    ``delta`` (n, 3) in model units (n = 6, the colors; 6 per contrast level for ``text_contrast_on="chroma"``),
    isotropic variance ``s2``. Shared by every prompt that uses it; ``key`` names it."""

    key: str
    geo: Geometry
    beta: torch.Tensor
    delta: torch.Tensor
    s2: float
    mixed: bool = False  # projections and per-component terms in float32, densities and sums in float64
    pull_index: torch.Tensor | None = None  # (G,) a pulled copy: the component each one moved toward (``pulled``)
    pull: float = 0.0
    base_mu: torch.Tensor | None = None  # (G, P) the means before the pull (the set's own means when not pulled)
    base: "ComponentSet | None" = None  # the unpulled set a pulled copy was made from
    #: a ``palette`` set's columns: alternatives of which each (geometry, color) component takes one (chroma levels,
    #: ``Mixture.picks``), or False: each column a component of its own (``contrast_levels``)
    pick_columns: bool = True
    dnorm: torch.Tensor = field(init=False)  # (n,)
    #: (noise level, work dtype) -> (shrinkage (n, G, r), log det (n, G)): they depend on the sample only through its
    #: noise level, which takes at most 1000 values (``_shrinkage_at``)
    _shrink_cache: dict = field(init=False, default_factory=dict, repr=False, compare=False)
    dhat: torch.Tensor = field(init=False)  # (n, 3)
    base_mu_sum: torch.Tensor = field(init=False)  # (G,)

    def __post_init__(self) -> None:
        self.dnorm = self.delta.norm(dim=1)
        self.dhat = self.delta / self.dnorm.unsqueeze(1)
        if self.base_mu is None:
            self.base_mu = self.geo.mu
        self.base_mu_sum = self.base_mu.sum(1)

    @property
    def dim(self) -> int:
        return 3 * int(self.geo.mu.shape[1])

    @property
    def colors(self) -> int:
        """n, the color vectors of every geometry component (the columns of a prompt's log weights)."""
        return int(self.delta.shape[0])

    @property
    def palette(self) -> bool:
        """Several color vectors per color, level-major: one per chroma level (``text_contrast_on="chroma"``; a prompt
        gives each (geometry, color) component one of them, so the batched denoiser evaluates one column per color,
        ``terms``' ``pick``) or per contrast level (``contrast_levels``: every column is a component)."""
        return self.colors > len(COLORS)

    @property
    def picked(self) -> bool:
        """A palette whose columns are picked per component (``pick_columns``): its shrinkage depends on each row's
        columns and is computed in ``terms``."""
        return self.palette and self.pick_columns

    def pulled(self, key: str, shapes: list[int], pull: float) -> "ComponentSet":
        """The set as a prompt naming the shapes ``shapes`` (indices) sees it: every component's geometry mean moves
        ``pull`` of the way toward the nearest component of a named shape (those of the named shapes stay).

        Colors are not pulled: a color pull (every color moving toward the named one) was measured to send 4 of 8
        SDS images of "a red circle" at CFG 100 to mottled yellow-green discs, against 0 of 8 without it
        (experiments/exact/README.md); the named color's contrast term already tells CFG which color to push."""
        mu, index = self.geo.mu, self.geo.nearest(shapes)
        geo = self.geo.with_mean(mu + pull * (mu[index] - mu))  # named shapes: exactly unchanged
        return ComponentSet(key, geo, self.beta, self.delta, self.s2, self.mixed, index, pull, mu, self)

    def prepare(self, x: torch.Tensor, abar: torch.Tensor, shared: dict | None = None) -> dict[str, torch.Tensor]:
        """What the densities of x (B, 3, P) at noise level abar (B,) need (``shared_terms``, then ``mean_terms``)."""
        pre = self.shared_terms(x, abar, shared)
        return {**pre, "y_delta_mu": self.mean_terms(pre)}

    def shared_terms(self, x: torch.Tensor, abar: torch.Tensor, shared: dict | None = None) -> dict[str, torch.Tensor]:
        """What every prompt's densities of x (B, 3, P) at noise level abar (B,) share, cached in ``shared``: the
        projections of x on the geometry's basis and (unpulled) means (the expensive part, O(B 3 P G r), once per
        basis: corruptions with the same spatial map share it), the shrinkage and the log-determinants.

        The shrinkage ``g`` and the log-determinant depend on the sample only through its noise level, so each level's
        are computed once and kept by the set (``_shrinkage_at``)."""
        geo = self.geo
        B, _, P = x.shape
        G, r = geo.num, geo.rank
        work = torch.float32 if self.mixed else torch.float64
        sa = abar.sqrt()
        shared = {} if shared is None else shared
        basis = ("basis", id(geo.Q_all), id(self.base_mu), self.mixed)
        if basis not in shared:  # x's projections: y = x - sqrt(a) beta 1 follows from them per background beta
            Q_all = geo.Q_all32 if self.mixed else geo.Q_all
            shared[basis] = {"xq": (x.reshape(B * 3, P).to(work) @ Q_all).view(B, 3, G * r),
                             "q_sum": geo.q_sum32 if self.mixed else geo.q_sum, "xmu": torch.matmul(x, self.base_mu.T),
                             "mu_sum": self.base_mu_sum, "x_sum": x.sum(2), "xx": (x * x).sum((1, 2))}
        xs = shared[basis]
        # a pulled set shares its base's basis, variances, background and colors: all but its means' terms
        key = (id(geo.Q_all), id(geo.lam), id(self.beta), id(self.delta), self.s2, self.mixed)
        if key not in shared:
            c = abar * self.s2 + (1 - abar)  # (B,)
            sb = sa.view(B, 1) * self.beta.view(1, 3)  # (B, 3): the noised background
            y_q = xs["xq"] - sb.to(work).unsqueeze(2) * xs["q_sum"].view(1, 1, -1)
            ymu = xs["xmu"] - sb.unsqueeze(2) * xs["mu_sum"].view(1, 1, -1)  # (B, 3, G): y . mu_g per channel
            yy = xs["xx"] - 2 * (sb * xs["x_sum"]).sum(1) + P * (sb**2).sum(1)
            shared[key] = {"abar": abar, "sa": sa, "c": c, "yy": yy, "ymu": ymu,
                           "dq": (self.dhat.to(work) @ y_q).view(B, self.colors, G, r)}
            if self.picked:
                return shared[key]
            shrink, logdet = self._shrinkage_at(abar, work)
            shared[key].update(shrink=shrink, logdet=logdet)
        return shared[key]

    def _shrinkage_at(self, abar: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``_shrinkage`` of each row's noise level ``abar`` (B,): ``(g (B, n, G, r), log det (B, n, G))``. Each level is
        computed once per set and kept (elementwise, so its values do not depend on the batch it came in): for 48
        images at their own t, recomputing them was ~14% of a one-condition eps call; a CFG call now takes 0.94x
        (2026-12-06)."""
        cache, keys = self._shrink_cache, [(level, work) for level in abar.tolist()]
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            new = torch.tensor([level for level, _ in missing], dtype=abar.dtype, device=abar.device)
            rho = new / (new * self.s2 + (1 - new))  # a / c per level
            shrink, logdet = self._shrinkage(rho.view(-1, 1, 1) * (self.dnorm**2).view(1, -1, 1), work)
            if len(cache) + len(missing) > SHRINK_CACHE_LEVELS:  # full: keep only this batch's levels
                kept = {k: cache[k] for k in keys if k in cache}
                cache.clear()
                cache.update(kept)
            cache.update((k, (g, d)) for k, g, d in zip(missing, shrink, logdet))
        if len(set(keys)) == 1:  # one level (a scheduled t for the batch): broadcast, no copy
            g, d = cache[keys[0]]
            return g.expand(len(keys), *g.shape), d.expand(len(keys), *d.shape)
        return torch.stack([cache[k][0] for k in keys]), torch.stack([cache[k][1] for k in keys])

    def _shrinkage(self, rho_d2: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, log det)`` of the components from ``rho_d2 = (a / c) |delta_c|^2`` (..., n, G): with ``al = rho_d2
        lam`` (``a l / c``), the shrinkage ``al / (1 + al)`` (..., n, G, r) in ``work`` and ``sum log1p(al)``."""
        al = rho_d2.unsqueeze(-1) * self.geo.lam.view(1, 1, *self.geo.lam.shape)
        return (al / (1 + al)).to(work), torch.log1p(al).sum(3)

    def mean_terms(self, pre: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(y . delta_c (x) mu_g)`` (rows, n, G) for the rows of ``pre`` (``shared_terms``, possibly row-sliced): a
        pulled copy's means are ``mu + k (mu[n] - mu)``, so its projections come from the base's by a gather."""
        ymu = pre["ymu"]
        if self.pull_index is not None:
            ymu = ymu + self.pull * (ymu[..., self.pull_index] - ymu)
        return self.delta @ ymu

    def terms(self, pre: dict[str, torch.Tensor], amp: torch.Tensor, means: "RowMeans | None" = None,
              pick: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-component Gaussian log-densities for the rows of ``pre`` (see ``prepare``) whose components have the
        color amplitudes ``amp`` (B, n, G) (the mean is ``beta + amp delta_c (x) mu_g``): ``log_prob`` (B, G, n),
        ``c`` (B,), ``gproj`` (B, n, G, r) (color-major, the layout of the matmuls) and ``amp``. ``means``: each
        row's pulled copy of this set (``RowMeans``; ``pre`` then holds the base's ``ymu``, not ``y_delta_mu``).
        ``pick`` (B, 6, G): for a ``picked`` palette set, the color column of each row's (color, geometry) component;
        the terms are then those of these columns only (``amp`` (B, 6, G), ``log_prob`` (B, G, 6), ``gproj`` (B, 6, G,
        r)), and ``pick`` is returned with them."""
        geo = self.geo
        B = pre["c"].shape[0]
        r, D = geo.rank, self.dim
        a, sa, c = pre["abar"].view(B, 1, 1), pre["sa"].view(B, 1, 1), pre["c"]
        dq = pre["dq"]
        if means is None:
            Qtmu, mu2, y_delta_mu = geo.Qtmu.unsqueeze(0), geo.mu2.view(1, 1, -1), pre["y_delta_mu"]
        else:
            Qtmu, mu2, y_delta_mu = means.Qtmu, means.mu2.unsqueeze(1), self.delta @ means.pull_rows(pre["ymu"])
        dnorm = self.dnorm.view(1, -1, 1)
        if pick is not None:
            dnorm, y_delta_mu = self.dnorm[pick], y_delta_mu.gather(1, pick)
            dq = dq.gather(1, pick.unsqueeze(3).expand(-1, -1, -1, r))
        if "shrink" in pre:
            shrink, logdet = pre["shrink"], pre["logdet"]
        else:  # a picked palette set: per row, from its columns' norms
            shrink, logdet = self._shrinkage((a / c.view(B, 1, 1)) * dnorm**2, dq.dtype)
        m_norm = sa * dnorm * amp  # (B, n, G): |sqrt(a) amp delta_c|
        proj = dq - m_norm.unsqueeze(3).to(dq) * Qtmu.to(dq).unsqueeze(1)
        d2 = pre["yy"].view(B, 1, 1) - 2 * sa * amp * y_delta_mu + a * amp**2 * dnorm**2 * mu2  # (B, n, G)
        gproj = shrink * proj
        maha = (d2 - (gproj * proj).sum(3).double()) / c.view(B, 1, 1)
        log_prob = -0.5 * (maha + logdet + D * torch.log(c).view(B, 1, 1) + D * math.log(2 * math.pi))
        return {"log_prob": log_prob.transpose(1, 2), "c": c, "gproj": gproj, "amp": amp, "pick": pick}

    def inv_cov_sum(self, x: torch.Tensor, abar: torch.Tensor, resp: torch.Tensor, terms: dict) -> torch.Tensor:
        """``sum_k resp_k Sigma_k^-1 (x - sqrt(a) m_k)`` over this set's components (resp: (B, G, n)), (B, 3, P)."""
        B, _, P = x.shape
        local, coef_q = self.inv_cov_parts(x, abar, resp, terms)
        return local - self.back_project(coef_q).view(B, 3, P)

    def inv_cov_parts(self, x: torch.Tensor, abar: torch.Tensor, resp: torch.Tensor, terms: dict,
                      means: "RowMeans | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``inv_cov_sum`` without its low-rank part: ``(local (B, 3, P), coef_q (B 3, G r))`` with ``inv_cov_sum =
        local - back_project(coef_q)``, so sets of one basis (a set and its pulled copies) back-project once."""
        geo = self.geo
        B, _, P = x.shape
        rc = (resp / terms["c"].view(B, 1, 1)).transpose(1, 2)  # (B, n, G)
        gproj = terms["gproj"]
        total = rc.sum((1, 2)).view(B, 1, 1)
        rc_amp, weighted = rc * terms["amp"], to_work(rc, gproj).unsqueeze(3) * gproj  # (B, n, G), (B, n, G, r)
        if terms.get("pick") is not None:  # the picked columns' sums, placed in the palette's columns
            pick = terms["pick"]
            rc_amp = rc_amp.new_zeros(B, self.colors, geo.num).scatter_(1, pick, rc_amp)
            weighted = weighted.new_zeros(B, self.colors, geo.num, geo.rank).scatter_(
                1, pick.unsqueeze(3).expand(-1, -1, -1, geo.rank), weighted)
        coef_mu = self.delta.T @ rc_amp  # (B, 3, G)
        coef_q = (self.dhat.T.to(gproj) @ weighted.reshape(B, self.colors, -1)).reshape(B * 3, -1)
        if means is not None:  # sum_g coef_g mu'_g over this (base) set's means
            coef_mu = means.pull_coef(coef_mu)
        coef_mu = coef_mu.reshape(B * 3, -1)
        mu_part = (float32_normal(coef_mu) @ geo.mu32).double() if self.mixed else coef_mu @ geo.mu
        sa = abar.sqrt().view(B, 1, 1)
        return x * total - sa * (self.beta.view(1, 3, 1) * total + mu_part.view(B, 3, P)), coef_q

    def basis_key(self) -> int:
        """Sets with the same key share the low-rank basis (a set and its pulled copies)."""
        return id(self.geo.Q_all)

    def back_project(self, coef_q: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """``coef_q @ Q_all^T`` (rows, G r) -> (rows, P), in float64. ``active`` (G,) bool: only these components'
        columns (the others' coefficients are dropped), which pays when fewer than half are active."""
        Q_all = self.geo.Q_all32 if self.mixed else self.geo.Q_all
        if active is not None and int(active.sum()) < active.numel() // 2:
            P, G, r = Q_all.shape[0], self.geo.num, self.geo.rank
            Q_all = Q_all.view(P, G, r)[:, active].reshape(P, -1)
            coef_q = coef_q.view(-1, G, r)[:, active].reshape(coef_q.shape[0], -1)
        return (to_work(coef_q, Q_all) @ Q_all.T).double()


@dataclass
class RowMeans:
    """Each row's pulled copy of one base set (``ComponentSet.pulled``), so that the copies of all the prompts of a
    batch are evaluated as the base set in one pass: ``Qtmu`` (R, G, r) and ``mu2`` (R, G) of each row's means,
    ``index`` (R, G) the component each one is pulled toward (itself when not pulled) and ``pull`` (R, 1, 1) k.
    A pulled mean is ``mu + k (mu[n] - mu)``, so its projections are a gather of the base's and a sum over it is a
    scatter onto the base's means."""

    Qtmu: torch.Tensor
    mu2: torch.Tensor
    index: torch.Tensor
    pull: torch.Tensor

    @classmethod
    def of(cls, variants: list[ComponentSet], row_variant: torch.Tensor) -> "RowMeans":
        G = variants[0].geo.num
        own = torch.arange(G, device=row_variant.device)
        index = torch.stack([own if v.pull_index is None else v.pull_index for v in variants])[row_variant]
        pull = torch.tensor([v.pull for v in variants], dtype=torch.float64, device=row_variant.device)[row_variant]
        return cls(torch.stack([v.geo.Qtmu for v in variants])[row_variant],
                   torch.stack([v.geo.mu2 for v in variants])[row_variant], index, pull.view(-1, 1, 1))

    def pull_rows(self, ymu: torch.Tensor) -> torch.Tensor:
        """(R, ch, G) projections on the base means -> on each row's pulled means."""
        return ymu + self.pull * (ymu.gather(2, self.index.unsqueeze(1).expand_as(ymu)) - ymu)

    def pull_coef(self, coef: torch.Tensor) -> torch.Tensor:
        """(R, ch, G) coefficients of each row's pulled means -> of the base means."""
        moved = torch.zeros_like(coef).scatter_add_(2, self.index.unsqueeze(1).expand_as(coef), coef)
        return coef + self.pull * (moved - coef)


@dataclass
class GenericGaussian:
    """The "generic image" component every prompt shares: ``N(m, V diag(lam) V^T + s2 I)`` in model space, the
    Gaussian with the unconditional data's mean and (rank-``r`` + isotropic) covariance (``generic_gaussian``).

    Why: a mixture of sharp components snaps any input off the data to its nearest component at small t (its exact
    x0 prediction is a projection), where a trained network is local (it keeps a blurry input blurry). A broad
    component with a small weight is far likelier than every sharp one off the data and negligible on it, so it makes
    the exact denoiser local off the data; and because every prompt holds the same one, ``eps_cond - eps_uncond``
    vanishes where it dominates (CFG acts on what the prompt describes). Noised, it is ``N(sqrt(a) m, V diag(a lam)
    V^T + c I)``, ``c = a s2 + 1 - a``, evaluated by Woodbury like the concept components."""

    m: torch.Tensor  # (D,)
    V: torch.Tensor  # (D, r) orthonormal
    lam: torch.Tensor  # (r,) >= 0: variance above s2 along V
    s2: float
    mixed: bool = False
    V32: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.V32 = float32_normal(self.V)

    @property
    def dim(self) -> int:
        return int(self.m.shape[0])

    def terms(self, x: torch.Tensor, abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log N(x; sqrt(a) m, Sigma_t) (B,), Sigma_t^-1 (x - sqrt(a) m) (B, D))`` for x (B, D) at levels abar
        (B,)."""
        a = abar.view(-1, 1)
        c = a * self.s2 + 1 - a
        y = x - a.sqrt() * self.m
        V = self.V32 if self.mixed else self.V
        yv = (to_work(y, V) @ V).double()  # (B, r)
        al = a * self.lam.view(1, -1) / c
        g = al / (1 + al)
        maha = ((y * y).sum(1, keepdim=True) - (g * yv * yv).sum(1, keepdim=True)) / c
        log_n = -0.5 * (maha + torch.log1p(al).sum(1, keepdim=True) + self.dim * torch.log(c)
                        + self.dim * math.log(2 * math.pi))
        inv = (y - (to_work(g * yv, V) @ V.T).double()) / c
        return log_n.view(-1), inv

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.lam.numel(), generator=generator, dtype=torch.float64).to(self.m)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64).to(self.m)
        return self.m + (z * self.lam.sqrt()) @ self.V.T + math.sqrt(self.s2) * e

    def second_moment(self) -> torch.Tensor:
        """E|x|^2."""
        return (self.m**2).sum() + self.lam.sum() + self.dim * self.s2

    def cov_apply(self, X: torch.Tensor) -> torch.Tensor:
        """``X E[x x^T]`` (n, D)."""
        return (X @ self.m).unsqueeze(1) * self.m + ((X @ self.V) * self.lam) @ self.V.T + self.s2 * X


def generic_gaussian(mix: "Mixture", rank: int, generator: torch.Generator, mixed: bool) -> GenericGaussian:
    """The Gaussian with ``mix``'s mean and covariance, the covariance kept as its top ``rank`` eigenpairs plus the
    rest's mean variance (isotropic, so the trace is exact): randomized subspace iteration (Halko et al. 2011,
    two power iterations, 64 extra columns) with ``mix.cov_apply``, which never forms the D x D matrix."""
    D = mix.dim
    X = torch.randn(rank + 64, D, generator=generator, dtype=torch.float64).to(mix.sets[0].beta)
    Q = torch.linalg.qr(mix.cov_apply(X).T)[0]
    for _ in range(2):
        Q = torch.linalg.qr(mix.cov_apply(Q.T).T)[0]
    small = mix.cov_apply(Q.T) @ Q
    ev, W = torch.linalg.eigh(0.5 * (small + small.T))
    ev, V = ev.flip(0)[:rank], (Q @ W).flip(1)[:, :rank]
    s2 = float((mix.trace_cov() - ev.sum()) / (D - rank))
    return GenericGaussian(mix.mean(), V.contiguous(), (ev - s2).clamp(min=0), s2, mixed)


@dataclass
class Mixture:
    """A prompt's exact distribution: component sets with log weights ``log_pi[i]`` (G_i, n_i) that sum (exp) to 1
    over all sets (and the generic component's ``exp(log_generic)``) and color amplitudes ``amps[i]`` (G_i, n_i)
    (component (g, c) has mean ``beta + amp delta_c (x) mu_g``; all 1 when None). ``concepts`` are the (shape,
    color) pairs the prompt names; ``generic``: the shared generic-image Gaussian (``GenericGaussian``), or None.
    ``picks[i]`` (G_i, 6): for a ``picked`` palette set, the column of each (geometry, color) component, the one block
    where its log weight can be finite (the other columns of that color must be -inf); None for the others."""

    prompt: str
    sets: list[ComponentSet]
    log_pi: list[torch.Tensor]
    concepts: list[tuple[str, str]]
    size: int
    amps: list[torch.Tensor] | None = None
    generic: GenericGaussian | None = None
    log_generic: float = -math.inf

    def __post_init__(self) -> None:
        if self.amps is None:
            self.amps = [torch.ones_like(lp) for lp in self.log_pi]
        self.picks: list[torch.Tensor | None] = [None] * len(self.sets)
        for i, (s, lp) in enumerate(zip(self.sets, self.log_pi)):
            if s.picked:
                finite = torch.isfinite(lp.view(lp.shape[0], -1, 6))  # (G, blocks, 6)
                if bool((finite.sum(1) > 1).any()):
                    raise ValueError(f"set {s.key!r}: a component has finite weight in two color blocks")
                self.picks[i] = finite.int().argmax(1) * 6 + torch.arange(6, device=lp.device)

    @property
    def dim(self) -> int:
        return self.sets[0].dim

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 3, -1).to(self.sets[0].beta)

    # ------------------------------------------------------------------ noised density
    def log_joint(self, x: torch.Tensor, abar: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
        """Per-set terms and the joint log weights ``log pi_k + log N_k`` (B, K) over all components."""
        B = x.shape[0]
        shared: dict = {}
        terms = [s.terms(s.prepare(x, abar, shared), amp.T.unsqueeze(0).expand(B, -1, -1))
                 for s, amp in zip(self.sets, self.amps)]
        logits = torch.cat([(t["log_prob"] + lp).flatten(1) for t, lp in zip(terms, self.log_pi)], 1)
        if self.generic is not None:
            log_n, inv = self.generic.terms(x.reshape(B, -1), abar)
            terms.append({"inv": inv})
            logits = torch.cat([logits, (log_n + self.log_generic).unsqueeze(1)], 1)
        return terms, logits

    def log_prob(self, x: torch.Tensor, abar: torch.Tensor | None = None) -> torch.Tensor:
        """log p_t(x) in model space (t = 0, the clean distribution, when ``abar`` is None). x: (B, D) or images."""
        x = self._rows(x)
        if abar is None:
            abar = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return torch.logsumexp(self.log_joint(x, abar.to(x))[1], dim=1)

    def responsibilities(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """Posterior over all components (B, K), in the order of ``sets`` then (geometry, color), the generic
        component last."""
        x = self._rows(x)
        return torch.softmax(self.log_joint(x, abar.to(x))[1], dim=1)

    def score(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x), (B, D)."""
        x = self._rows(x)
        abar = abar.to(x)
        terms, logits = self.log_joint(x, abar)
        resp = torch.softmax(logits, dim=1)
        out = torch.zeros_like(x)
        start = 0
        for s, t, lp in zip(self.sets, terms, self.log_pi):
            n = lp.numel()
            out = out + s.inv_cov_sum(x, abar, resp[:, start:start + n].view(-1, *lp.shape), t)
            start += n
        out = out.reshape(x.shape[0], -1)
        if self.generic is not None:
            out = out + resp[:, -1:] * terms[-1]["inv"]
        return -out

    def color_offsets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For clean images x (B, D) of a prompt without modifier words: the mean color offset ``amp delta_c (x) mu_g``
        (B, D) of each one's most likely clean component (of ``sets[0]``), and that component's contrast relative to
        the rendered color (B,) (1 but for ``contrast_levels``): the world's lighting probes scale it."""
        x = self._rows(x)
        s, amp = self.sets[0], self.amps[0]
        k = self.responsibilities(x, torch.ones(x.shape[0]).to(x))[:, : s.geo.num * s.colors].argmax(1)
        gi, ci = k // s.colors, k % s.colors
        offset = amp[gi, ci].view(-1, 1, 1) * s.delta[ci].view(-1, 3, 1) * s.geo.mu[gi].unsqueeze(1)
        return offset.reshape(x.shape[0], -1), s.dnorm[ci] / s.dnorm.view(-1, 6).max(0).values[ci % 6]

    def shape_mass(self, x: torch.Tensor, abar: torch.Tensor, shape: str) -> torch.Tensor:
        """(B,): the posterior mass at noise level abar (B,) on ``sets[0]``'s components of ``shape``."""
        s = self.sets[0]
        r = self.responsibilities(x, abar)[:, : s.geo.num * s.colors]
        return r.view(-1, s.geo.num, s.colors)[:, s.geo.shape == list(SHAPES).index(shape)].sum((1, 2))

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n exact samples of the clean distribution, (n, D) float64 (draws on the CPU generator's stream)."""
        flat = torch.cat([lp.flatten() for lp in self.log_pi]
                         + ([torch.tensor([self.log_generic]).to(self.log_pi[0])] if self.generic is not None else [])
                         ).exp().cpu()
        idx = torch.multinomial(flat.float(), n, replacement=True, generator=generator)
        out = torch.empty(n, 3, self.sets[0].geo.mu.shape[1], dtype=torch.float64)
        r_max = max(s.geo.rank for s in self.sets)
        z = torch.randn(n, r_max, generator=generator, dtype=torch.float64)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64).view(n, 3, -1)
        start = 0
        for s, lp, amp in zip(self.sets, self.log_pi, self.amps):
            count = lp.numel()
            rows = ((idx >= start) & (idx < start + count)).nonzero().flatten()
            start_i = start
            start += count
            if rows.numel() == 0:
                continue
            local = (idx[rows] - start_i).to(s.beta.device)
            g, c = local // s.colors, local % s.colors
            geo = s.geo
            zz = z[rows, : geo.rank].to(s.beta)
            m = geo.mu[g] + torch.einsum("npr,nr->np", geo.Q[g], geo.lam[g].sqrt() * zz)
            color = amp[g, c].unsqueeze(1) * s.delta[c]  # (n, 3)
            x = s.beta.view(1, 3, 1) + color.unsqueeze(2) * m.unsqueeze(1) + math.sqrt(s.s2) * e[rows].to(s.beta)
            out[rows] = x.cpu()
        out = out.reshape(n, -1)
        rows = (idx == start).nonzero().flatten()  # the generic component (index after all sets')
        if rows.numel() > 0:
            out[rows] = self.generic.sample(rows.numel(), generator).cpu()
        return out.to(self.sets[0].beta.device)

    # ------------------------------------------------------------------ moments (exact metrics)
    def _weights(self) -> Iterator[tuple[ComponentSet, torch.Tensor, torch.Tensor]]:
        for s, lp, amp in zip(self.sets, self.log_pi, self.amps):
            yield s, lp.exp(), amp

    def mean(self) -> torch.Tensor:
        """E[x], (D,)."""
        out = 0
        for s, pi, amp in self._weights():
            out = out + pi.sum() * s.beta.view(3, 1) + torch.einsum("gc,ck,gp->kp", pi * amp, s.delta, s.geo.mu)
        out = out.reshape(-1)
        return out + math.exp(self.log_generic) * self.generic.m if self.generic is not None else out

    def trace_cov(self) -> torch.Tensor:
        second = 0
        for s, pi, amp in self._weights():
            P = s.geo.mu.shape[1]
            m2 = P * (s.beta**2).sum() + 2 * amp * (s.delta @ s.beta).view(1, -1) * s.geo.mu_sum.view(-1, 1) \
                + amp**2 * (s.dnorm**2).view(1, -1) * s.geo.mu2.view(-1, 1)  # |m_k|^2, (G, n)
            low = (s.dnorm**2).view(1, -1) * s.geo.lam.sum(1).view(-1, 1)
            second = second + (pi * (m2 + low + s.dim * s.s2)).sum()
        if self.generic is not None:
            second = second + math.exp(self.log_generic) * self.generic.second_moment()
        return second - (self.mean() ** 2).sum()

    def cov_apply(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ Sigma`` for the mixture covariance Sigma (X: (n, D)), without forming Sigma (D x D)."""
        X3 = self._rows(X)
        n = X3.shape[0]
        out = torch.zeros_like(X3)
        for s, pi, amp in self._weights():
            geo = s.geo
            xm = (X3 * s.beta.view(1, 3, 1)).sum((1, 2)).view(n, 1, 1) \
                + amp * torch.einsum("nkg,ck->ngc", torch.einsum("nkp,gp->nkg", X3, geo.mu), s.delta)  # X m_k
            w = xm * pi.unsqueeze(0)
            out = out + w.sum((1, 2)).view(n, 1, 1) * s.beta.view(1, 3, 1) \
                + torch.einsum("ngc,ck,gp->nkp", w * amp, s.delta, geo.mu)
            xq = torch.einsum("nkgr,ck->ngcr", (X3.reshape(n * 3, -1) @ geo.Q_all).view(n, 3, geo.num, geo.rank),
                              s.dhat)
            coef = xq * (pi * s.dnorm.view(1, -1) ** 2).unsqueeze(0).unsqueeze(3) * geo.lam.view(1, geo.num, 1, -1)
            coef_q = torch.einsum("ngcr,ck->nkgr", coef, s.dhat).reshape(n * 3, -1)
            out = out + (coef_q @ geo.Q_all.T).view(n, 3, -1) + pi.sum() * s.s2 * X3
        m = self.mean()
        Xf = X3.reshape(n, -1)
        out = out.reshape(n, -1)
        if self.generic is not None:
            out = out + math.exp(self.log_generic) * self.generic.cov_apply(Xf)
        return out - (Xf @ m).unsqueeze(1) * m.unsqueeze(0)

    def expected_spatial_energy(self, kernel: torch.Tensor) -> float:
        """Exact ``E|H x|^2 / D`` for H a per-channel convolution with ``kernel`` (k x k, circular padding) whose
        entries sum to 0 (so constant images map to 0)."""
        k = kernel.to(self.sets[0].beta)
        filt = lambda m: _conv_circular(m.reshape(-1, 1, self.size, self.size), k)  # noqa: E731
        total = 0
        for s, pi, amp in self._weights():
            geo = s.geo
            mean_term = (filt(geo.mu) ** 2).flatten(1).sum(1)  # (G,)
            cols = geo.Q.transpose(1, 2).reshape(-1, geo.mu.shape[1])
            low_term = ((filt(cols) ** 2).flatten(1).sum(1).view(geo.num, geo.rank) * geo.lam).sum(1)
            per = (s.dnorm**2).view(1, -1) * (amp**2 * mean_term.view(-1, 1) + low_term.view(-1, 1)) \
                + s.s2 * s.dim * float((k**2).sum())
            total = total + (pi * per).sum()
        if self.generic is not None:
            gen = self.generic
            along = (filt(gen.V.T) ** 2).flatten(1).sum(1).view(-1, 3).sum(1)  # |H v_j|^2, (r,)
            per = (filt(gen.m) ** 2).sum() + (along * gen.lam).sum() + gen.s2 * gen.dim * float((k**2).sum())
            total = total + math.exp(self.log_generic) * per
        return float(total / self.dim)

    def expected_chroma_energy(self, shift: torch.Tensor, scale: float) -> float:
        """Exact mean squared chroma (deviation of each pixel's RGB from its gray level) of the images in [-1, 1]
        units, ``x = scale z + shift``, per pixel."""
        Pc = torch.eye(3, dtype=torch.float64, device=shift.device) - 1 / 3
        total_sq, mean_z = 0, self.mean().view(3, -1)
        for s, pi, amp in self._weights():
            P = s.geo.mu.shape[1]
            pb, pd = Pc @ s.beta, s.delta @ Pc  # (3,), (n, 3)
            m2 = P * (pb**2).sum() + 2 * amp * (pd @ pb).view(1, -1) * s.geo.mu_sum.view(-1, 1) \
                + amp**2 * (pd**2).sum(1).view(1, -1) * s.geo.mu2.view(-1, 1)
            low = (pd**2).sum(1).view(1, -1) * s.geo.lam.sum(1).view(-1, 1)
            total_sq = total_sq + (pi * (m2 + low + 2 * P * s.s2)).sum()
        P = mean_z.shape[1]
        if self.generic is not None:
            gen = self.generic
            chroma = lambda v: (Pc @ v.reshape(-1, 3, P)) ** 2  # noqa: E731  (n, 3, P)
            second = chroma(gen.m).sum() + (chroma(gen.V.T).sum((1, 2)) * gen.lam).sum() + 2 * P * gen.s2
            total_sq = total_sq + math.exp(self.log_generic) * second
        ps = Pc @ shift
        cross = 2 * scale * (ps.view(3, 1) * (Pc @ mean_z)).sum()
        return float((scale**2 * total_sq + cross + P * (ps**2).sum()) / P)


def _conv_circular(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    r = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (r, r, r, r), mode="circular"), kernel.view(1, 1, *kernel.shape))


def tilt_logits(parsed: ParsedPrompt, adherence: float) -> torch.Tensor:
    """Log weights (6 shapes, 6 colors) of the prompt's concepts: ``lambda * matches`` normalized, with lambda
    such that the named concepts hold ``adherence`` of the mass (all equal when the prompt names nothing)."""
    matches = torch.tensor([[parsed.matches(s, c) for c in COLORS] for s in SHAPES], dtype=torch.float64)
    full = matches == 2
    if bool(full.all()):
        return torch.full((len(SHAPES), len(COLORS)), -math.log(full.numel()), dtype=torch.float64)
    mass = lambda lam: float(torch.softmax((lam * matches).flatten(), 0).view_as(matches)[full].sum())  # noqa: E731
    lo, hi = 0.0, 60.0
    if mass(lo) >= adherence:
        hi = 0.0
    for _ in range(80):  # bisection: the named concepts' mass rises monotonically with lambda
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) < adherence else (lo, mid)
    return torch.log_softmax((hi * matches).flatten(), 0).view_as(matches)


def contrast_amplitudes(parsed: ParsedPrompt, contrast: float) -> torch.Tensor:
    """Color amplitudes (6 shapes, 6 colors): ``1 - b (1 - f)`` with f the fraction of the attributes the prompt
    names (shape, color) that the concept has (f = 0 for every concept of a prompt that names nothing)."""
    named = int(bool(parsed.shapes)) + int(bool(parsed.colors))
    if named == 0:
        return torch.full((len(SHAPES), len(COLORS)), 1 - contrast, dtype=torch.float64)
    hits = torch.tensor([[int(s in parsed.shapes) + int(c in parsed.colors) for c in COLORS] for s in SHAPES],
                        dtype=torch.float64)
    return 1 - contrast * (1 - hits / named)


@builds("prior", "analytic", AnalyticConfig)
class AnalyticPrior(DiffusionPrior):
    """Exact prior (``prior=analytic``). ``sample_shape = (3, S, S)`` in model units ``z = (x - shift) / scale``."""

    is_latent = True  # its model space is an (affine) latent space: image targets optimize z, as with SD latents
    has_true_distribution = True  # closed-form eps, exact samples and log-density: exact metrics apply
    combines_linearly = True  # a weighted sum of conditionings back-projects once (``_predict_eps_batched``)

    def __init__(self, config: AnalyticConfig | None = None):
        super().__init__()
        self.config = config or AnalyticConfig()
        self.world: World = load_world(self.config.world_spec(), self.config.cache_dir)
        self._device = resolve_device(self.config.device)
        self.to(self._device)
        self._sets: dict[str, ComponentSet] = {}
        self._geometries: dict[tuple, Geometry] = {}
        self._generic: GenericGaussian | None = None
        self._model_space()

    # ------------------------------------------------------------------ model space
    def _model_space(self) -> None:
        """shift (per channel) and scale: the exact mean and RMS deviation of the data (every concept equally likely,
        full contrast; the unconditional distribution is the same at ``1 - text_contrast`` of the contrast)."""
        b, d = color_vectors()
        geo = Geometry.from_model(self.world.fine, None, self.config.size, "cpu", self.config.contrast_std)
        pixel = ComponentSet("pixels", geo, b, d, 0.0)
        uncond = self._weights(geo, tilt_logits(parse_prompt(""), self.config.text_adherence))
        sets, log_pi, amps = self._at_contrast_levels([pixel], [uncond], [torch.ones_like(uncond)])
        mix = Mixture("", sets, log_pi, [], self.config.size, amps)
        shift = mix.mean().view(3, -1).mean(1)
        spread = ((mix.mean().view(3, -1) - shift.view(3, 1)) ** 2).sum() + mix.trace_cov()
        # data = geometry + sensor noise of std noise_floor * scale: scale^2 = spread / D + noise_floor^2 scale^2
        scale = math.sqrt(float(spread) / mix.dim / (1 - self.config.noise_floor**2))
        self.shift, self.scale = shift.to(self._device), scale

    def _component_set(self, modifier: str | None, parsed: ParsedPrompt | None = None) -> ComponentSet:
        """The clean set (modifier None) or a modifier word's corrupted copy, as the prompt ``parsed`` pulls it
        (``text_pull``; unpulled for a prompt that names no shape)."""
        key = modifier or "clean"
        pull = self.config.text_pull
        if parsed is not None and parsed.shapes and pull > 0:
            pulled_key = f"{key}|{'+'.join(parsed.shapes)}"
            if pulled_key not in self._sets:
                base = self._component_set(modifier)
                self._sets[pulled_key] = base.pulled(pulled_key, [SHAPES.index(x) for x in parsed.shapes], pull)
            return self._sets[pulled_key]
        if key not in self._sets:
            mod = MODIFIERS[modifier] if modifier else None
            model = self.world.coarse if mod else self.world.fine
            spatial = ("coarse", mod.spatial) if mod else ("fine",)  # corruptions of one spatial map share a basis
            if spatial not in self._geometries:
                self._geometries[spatial] = Geometry.from_model(model, mod, self.config.size, self._device,
                                                                    self.config.contrast_std)
            geo = self._geometries[spatial]
            b, d = color_vectors()
            extra = 0.0
            if mod:
                M, o = mod.color_affine()
                b, d, extra = M @ b + o, d @ M.T, mod.noise_std**2
            beta = ((b.to(self._device) - self.shift) / self.scale)
            delta = d.to(self._device) / self.scale
            s2 = self.config.noise_floor**2 + extra / self.scale**2
            self._sets[key] = ComponentSet(key, geo, beta, delta, s2, mixed=self.config.precision == "mixed")
        return self._sets[key]

    @staticmethod
    def _weights(geo: Geometry, concept_logits: torch.Tensor) -> torch.Tensor:
        """(G, 6) log weights: concept weight of each component's shape x its share of that shape's renders."""
        return concept_logits.to(geo.log_w)[geo.shape] + geo.log_w.view(-1, 1)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.config.size, self.config.size)

    # ------------------------------------------------------------------ text = exact distributions
    def generic(self) -> GenericGaussian:
        """The generic-image Gaussian (``GenericGaussian``): the moments of the unconditional distribution without it,
        computed once per prior (~1 s; randomized eigenpairs with a generator seeded by the world's seed)."""
        if self._generic is None:
            uncond = self.build_mixture("", generic=False)
            gen = torch.Generator().manual_seed(self.config.seed)
            self._generic = generic_gaussian(uncond, self.config.generic_rank, gen, self.config.precision == "mixed")
        return self._generic

    def build_mixture(self, prompt: str, generic: bool = True) -> Mixture:
        """The prompt's mixture: the clean sets and its modifier words' copies (``modifier_weight`` each), and the
        degraded copies: ``degraded_share`` of the mass for a prompt that names no concept (the unconditional
        distribution), ``degraded_share * (1 - text_adherence)`` for one that does (captioned images are clean); and
        ``generic_share`` of every prompt's mass on the shared generic-image Gaussian (the rest scaled by
        ``1 - generic_share``; ``generic=False`` leaves it out)."""
        parsed = parse_prompt(prompt)
        concepts = tilt_logits(parsed, self.config.text_adherence)
        amplitude = contrast_amplitudes(parsed, self.config.text_contrast)
        words = parsed.modifiers
        w = self.config.modifier_weight
        share = self.config.degraded_share
        if parsed.shapes or parsed.colors:
            share *= 1 - self.config.text_adherence
        parts = [(None, math.log(1 - share) - math.log(1 + w * len(words)))]
        parts += [(m, math.log(1 - share) + math.log(w) - math.log(1 + w * len(words))) for m in words]
        if share > 0:
            parts += [(m, math.log(share / len(self.config.degraded_words))) for m in self.config.degraded_words]
        weights: dict[str, tuple[ComponentSet, torch.Tensor]] = {}
        for modifier, log_mass in parts:  # a word both in the prompt and degraded_words: one set, masses added
            s = self._component_set(modifier, parsed)
            lp = self._weights(s.geo, concepts) + log_mass
            weights[s.key] = (s, torch.logaddexp(weights[s.key][1], lp) if s.key in weights else lp)
        if self.config.text_contrast_on == "chroma":  # 6 colors per contrast level, amplitudes all 1
            sets, log_pi = self._chroma_levels(list(weights.values()), amplitude)
            amps = [torch.ones_like(lp) for lp in log_pi]
        else:
            sets, log_pi = [v[0] for v in weights.values()], [v[1] for v in weights.values()]
            amps = [amplitude.to(s.geo.log_w)[s.geo.shape] for s in sets]
            sets, log_pi, amps = self._at_contrast_levels(sets, log_pi, amps)
        g = self.config.generic_share if generic else 0.0
        if g == 0:
            return Mixture(prompt, sets, log_pi, parsed.concepts(), self.config.size, amps)
        return Mixture(prompt, sets, [lp + math.log1p(-g) for lp in log_pi], parsed.concepts(),
                       self.config.size, amps, self.generic(), math.log(g))

    def _chroma_levels(self, weighted: list[tuple[ComponentSet, torch.Tensor]], amplitude: torch.Tensor
                       ) -> tuple[list[ComponentSet], list[torch.Tensor]]:
        """``text_contrast_on="chroma"``: the concepts at contrast level ``l`` < 1 (``contrast_amplitudes``) have color
        vectors that keep their gray part and ``l`` of their chroma, ``d_c -> l d_c + (1 - l) mean(d_c) 1`` (the
        background is gray, so this is the shape's chroma). Each set becomes one set with 6 colors per level the
        prompt uses (``_recolored``), its log weights (G, 6 L) finite in the block of each component's level."""
        sets, log_pi = [], []
        levels = tuple(sorted(set(amplitude.flatten().tolist()), reverse=True))
        for s, lp in weighted:
            level_of = amplitude.to(s.geo.log_w)[s.geo.shape]  # (G, 6)
            sets.append(self._recolored(s, levels))
            log_pi.append(torch.cat([lp.masked_fill(level_of != level, -math.inf) for level in levels], 1))
        return sets, log_pi

    def _recolored(self, s: ComponentSet, levels: tuple[float, ...]) -> ComponentSet:
        """``s`` with the 6 color vectors at each chroma level of ``levels``, (6 L, 3) level-major (a picked palette
        set; the "oversaturated" word's chroma map at gain l)."""
        name = "chroma " + ",".join(f"{level:.6g}" for level in levels)
        return self._palette(s, name, lambda d: torch.cat([d @ saturation(level)[0].to(d).T for level in levels]))

    def _at_contrast_levels(self, sets: list[ComponentSet], log_pi: list[torch.Tensor], amps: list[torch.Tensor]
                            ) -> tuple[list[ComponentSet], list[torch.Tensor], list[torch.Tensor]]:
        """``contrast_levels``: each set as one palette set with its 6 colors at every level ``l delta_c`` (level-major;
        a component's variation scales with it, its sensor noise does not), each (geometry, color) component's
        weight split equally over the levels and its text amplitude kept. Unchanged when the option is off."""
        levels = self.config.contrast_levels
        if not levels:
            return sets, log_pi, amps
        name = "contrast " + ",".join(f"{level:.6g}" for level in levels)
        scaled = lambda d: torch.cat([level * d for level in levels])  # noqa: E731
        split, L = math.log(len(levels)), len(levels)
        return ([self._palette(s, name, scaled, pick_columns=False) for s in sets],
                [torch.cat([lp - split] * L, 1) for lp in log_pi], [torch.cat([a] * L, 1) for a in amps])

    def _palette(self, s: ComponentSet, name: str, colors, pick_columns: bool = True) -> ComponentSet:
        """``s`` with the color vectors ``colors(s.delta)`` (a palette, cached as ``"<key>|<name>"``). A pulled set's
        copy is the pulled copy of the unpulled set's, so every prompt's copies share one base and the batched
        denoiser evaluates each set once per call (Bridge's source prompts in ``make run``: 11 sets, not 99)."""
        key = f"{s.key}|{name}"
        if key not in self._sets:
            if s.base is not None:
                base = self._palette(s.base, name, colors, pick_columns)
                self._sets[key] = dataclasses.replace(s, key=key, delta=base.delta, base=base,
                                                      pick_columns=pick_columns)
            else:
                self._sets[key] = ComponentSet(key, s.geo, s.beta, colors(s.delta), s.s2, s.mixed,
                                               pick_columns=pick_columns)
        return self._sets[key]

    def _encode_prompts(self, prompts: list[str]) -> list[Mixture]:
        return [self.build_mixture(p) for p in prompts]

    def same_conditioning(self, a: str, b: str) -> bool:
        """Texts that parse alike have one distribution: view words are the identity, so the view interpolation of
        threestudio's Perp-Neg and LucidDreamer (:class:`~sdbridge.views.TextMix`) is exact here."""
        return a == b or parse_prompt(a) == parse_prompt(b)

    def mixture(self, prompt: str) -> Mixture:
        """The exact clean distribution of ``prompt`` (cached)."""
        return self.encode_text([prompt]).value[0]

    # ------------------------------------------------------------------ denoiser
    def _predict_eps_batched(self, x_t: torch.Tensor, t: torch.Tensor, conds: list[TextEmbedding],
                             weights: list[list[float]] | None = None) -> torch.Tensor:
        """Every base component set that any conditioning uses (a set, or the one a prompt's pulled copy comes from) is
        projected once on the whole batch (``shared_terms``; sets of one basis share the projections); each
        conditioning then evaluates each base set once, on the rows whose prompt uses it or a pulled copy of it (each
        row with its own copy's means: ``RowMeans``), and back-projects once per basis.

        ``weights`` (rows of one weight per conditioning): the weighted sums of the conditionings' eps instead. eps is
        linear in each conditioning's local term and low-rank coefficients, so those are summed (in float64) and each
        sum back-projects once: a CFG pair costs one back-projection, not two (``combines_linearly``)."""
        B = x_t.shape[0]
        x = x_t.reshape(B, 3, -1).double()
        abar = self.abar(t)
        used: dict[str, ComponentSet] = {}
        for cond in conds:
            for mix in cond.value:
                for s in mix.sets:
                    used.setdefault((s.base or s).key, s.base or s)
        shared: dict = {}
        pre = {k: s.shared_terms(x, abar, shared) for k, s in used.items()}
        generic = {id(mix.generic): mix.generic for cond in conds for mix in cond.value if mix.generic is not None}
        if len(generic) > 1:
            raise AssertionError("the prompts of one call hold different generic components")
        gen_terms = next(iter(generic.values())).terms(x.reshape(B, -1), abar) if generic else None
        per_cond: list[tuple[torch.Tensor, dict]] = []  # per conditioning: (local term, low-rank coefficients per basis)
        for j, cond in enumerate(conds):
            rows: dict[int, list[int]] = {}  # rows grouped by their (cached, hence shared) mixture
            for i, mix in enumerate(cond.value):
                rows.setdefault(id(mix), []).append(i)
            # per base set: (rows, the mixture's copy of the set, its amplitudes, its log weights) of each mixture
            # (and, for a palette set, its picked columns)
            members: dict[str, list[tuple[list[int], ComponentSet, torch.Tensor, torch.Tensor, torch.Tensor | None]]]
            members = {}
            for index in rows.values():
                mix = cond.value[index[0]]
                for s, amp, lp, pk in zip(mix.sets, mix.amps, mix.log_pi, mix.picks):
                    members.setdefault((s.base or s).key, []).append((index, s, amp, lp, pk))
            terms, logits, where, means = {}, {}, {}, {}
            for k, parts in members.items():
                base = used[k]
                idx = sorted(i for index, *_ in parts for i in index)
                if len(set(idx)) != len(idx):
                    raise AssertionError(f"a prompt's mixture holds two copies of the component set {k!r}")
                where[k] = torch.tensor(idx, device=x.device)
                pos = {row: n for n, row in enumerate(idx)}
                width = 6 if base.picked else base.colors  # a picked palette set: each row's column per color
                amp = torch.empty(len(idx), width, base.geo.num, dtype=torch.float64, device=x.device)
                lp_rows = torch.empty(len(idx), base.geo.num, width, dtype=torch.float64, device=x.device)
                pick = None
                if base.picked:
                    pick = torch.empty(len(idx), 6, base.geo.num, dtype=torch.long, device=x.device)
                variants: dict[str, int] = {}
                row_variant = torch.empty(len(idx), dtype=torch.long, device=x.device)
                for index, s, a_, lp, pk in parts:
                    local = torch.tensor([pos[r] for r in index], device=x.device)
                    if pk is not None:
                        a_, lp, pick[local] = a_.gather(1, pk), lp.gather(1, pk), pk.T
                    amp[local], lp_rows[local] = a_.T, lp
                    row_variant[local] = variants.setdefault(s.key, len(variants))
                rows_pre = pre[k] if len(idx) == B else {name: v[where[k]] for name, v in pre[k].items()}
                copies = [next(s for _, s, *_ in parts if s.key == key) for key in variants]
                if all(s is base for s in copies):
                    means[k] = None
                    rows_pre = {**rows_pre, "y_delta_mu": base.mean_terms(rows_pre)}
                else:
                    means[k] = RowMeans.of(copies, row_variant)
                terms[k] = base.terms(rows_pre, amp, means[k], pick)
                full = torch.full((B, *lp_rows.shape[1:]), -math.inf, dtype=torch.float64, device=x.device)
                full[where[k]] = terms[k]["log_prob"] + lp_rows
                logits[k] = full
            columns = [logits[k].flatten(1) for k in members]
            if gen_terms is not None:  # the generic component, last: its log weight per row (-inf: not in the prompt)
                log_g = torch.tensor([mix.log_generic if mix.generic is not None else -math.inf for mix in cond.value],
                                     dtype=torch.float64, device=x.device)
                columns.append((gen_terms[0] + log_g).unsqueeze(1))
            resp = torch.softmax(torch.cat(columns, 1), dim=1)
            acc = torch.zeros_like(x)
            if gen_terms is not None:
                acc = acc + (resp[:, -1:] * gen_terms[1]).view_as(x)
            # per basis: the low-rank coefficients of all rows, and which components carry posterior mass
            coef: dict[int, tuple[ComponentSet, torch.Tensor, torch.Tensor]] = {}
            start = 0
            for k in members:
                n = logits[k][0].numel()
                r = resp[:, start:start + n].view_as(logits[k])[where[k]]
                start += n
                active = r.amax(dim=(0, 2)) > NEGLIGIBLE_MASS  # (G,)
                if bool(active.any()):
                    idx, s = where[k], used[k]
                    local, coef_q = s.inv_cov_parts(x[idx], abar[idx], r, terms[k], means[k])
                    acc[idx] = acc[idx] + local
                    if s.basis_key() not in coef:
                        coef[s.basis_key()] = (s, torch.zeros(B, 3, coef_q.shape[1], dtype=coef_q.dtype,
                                                              device=x.device), torch.zeros_like(active))
                    coef[s.basis_key()][1][idx] += coef_q.view(len(idx), 3, -1)
                    coef[s.basis_key()][2].logical_or_(active)
            per_cond.append((acc, coef))
        sums = [[float(j == i) for j in range(len(conds))] for i in range(len(conds))] if weights is None else weights
        out = torch.empty(len(sums), B, x.shape[1] * x.shape[2], dtype=torch.float64, device=x.device)
        for m, row in enumerate(sums):
            acc = torch.zeros_like(x)
            basis: dict[int, tuple[ComponentSet, torch.Tensor, torch.Tensor]] = {}  # summed coefficients per basis
            for w, (local, coef) in zip(row, per_cond):
                if w == 0:
                    continue
                acc = acc + (local if w == 1 else w * local)
                for key, (s, c_q, active) in coef.items():
                    term = c_q if w == 1 else w * c_q
                    basis[key] = (s, basis[key][1] + term, basis[key][2] | active) if key in basis else (s, term, active)
            for s, c_q, active in basis.values():
                acc = acc - s.back_project(c_q.reshape(B * 3, -1), active).view_as(acc)
            out[m] = (1 - abar).sqrt().view(B, 1) * acc.reshape(B, -1)  # eps = -sqrt(1 - a) * score
        return out.float().reshape(len(sums), *x_t.shape)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompt: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of ``prompt``'s clean distribution, ``(n, 3, S, S)`` in model units."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return self.mixture(prompt).sample(n, gen).float().reshape(n, *self.sample_shape)

    @torch.no_grad()
    def sample_concept(self, shape: str, color: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """n exact samples of one concept alone (its clean components, without the text tilt's off-prompt mass)."""
        mix = self.mixture(f"a {color} {shape}")
        s = list(SHAPES).index(shape)
        keep = torch.full_like(mix.log_pi[0], -math.inf)
        rows = mix.sets[0].geo.shape == s
        col = list(COLORS).index(color)
        keep[rows, col::6] = mix.log_pi[0][rows, col::6]  # every contrast level of a palette set
        alone = Mixture(mix.prompt, mix.sets[:1], [keep - torch.logsumexp(keep.flatten(), 0)], [(shape, color)],
                        mix.size, mix.amps[:1])
        return alone.sample(n, generator).float().reshape(n, *self.sample_shape)

    @torch.no_grad()
    def sample_x_T(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Exact samples of p_T (t = 999) for each prompt: sqrt(abar_T) x0 + sqrt(1 - abar_T) eps.

        SD's schedule ends at abar_T = 0.0047, not 0, so N(0, I) is not exactly p_T; the exact prior knows p_T, so
        its samplers start there.
        """
        if isinstance(generator, SampleGenerators):  # independent samples: each from its own generator
            generator.check(len(prompts))
            return torch.cat([self.sample_x_T([p], g) for p, g in zip(prompts, generator.generators)])
        a_T = self.alphas_cumprod[-1].float()
        x0 = torch.cat([self.sample(p, 1, generator) for p in prompts])
        return a_T.sqrt() * x0 + (1 - a_T).sqrt() * torch.randn(x0.shape, generator=generator).to(x0)

    # ------------------------------------------------------------------ sample space
    def to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Model units to pixel units [-1, 1] (unclamped): ``x = scale z + shift``."""
        return z * self.scale + self.shift.to(z).view(1, 3, 1, 1)

    def from_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift.to(x).view(1, 3, 1, 1)) / self.scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, (size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.from_pixels(2 * images - 1)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((self.to_pixels(x0) + 1) / 2).clamp(0, 1)
