"""The exact prior: a Gaussian-mixture image world whose denoiser is known in closed form.

Each prompt selects a mixture of concepts (``sdbridge/priors/vocabulary.py``), each concept a low-rank Gaussian
``N(mu_k, U_k diag(lam_k) U_k^T + s_k^2 I)`` (``sdbridge/priors/world.py``). Noising with SD 2.1's schedule keeps the
mixture Gaussian:

    p_t(x) = sum_k pi_k N(x; sqrt(abar) mu_k, U_k diag(abar lam_k) U_k^T + c_k I),   c_k = abar s_k^2 + 1 - abar

and the exact epsilon is ``eps(x_t, t) = -sqrt(1 - abar_t) * grad log p_t(x_t)``. With Woodbury,

    Sigma_k^-1 d = (d - U_k (g_k * U_k^T d)) / c_k,     g_k = abar lam_k / (abar lam_k + c_k)
    log det Sigma_k = D log c_k + sum log(1 + abar lam_k / c_k)

so one evaluation costs O(K D r) for K components of rank r. Responsibilities use log-sum-exp in float64, which keeps
t near 0 (tiny c_k) and near 999 stable. The prior lives in pixel space: x0 is the image in [-1, 1], 3 x S x S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdbridge.rng import SampleGenerators
from sdbridge.priors.base import DiffusionPrior, PriorConfig, TextEmbedding, resolve_device
from sdbridge.priors.vocabulary import MODIFIERS, ParsedPrompt, parse_prompt
from sdbridge.priors.world import World, WorldSpec, load_world


@dataclass
class AnalyticConfig(PriorConfig):
    """``prior=analytic``: the exact Gaussian-mixture world (pixel space)."""

    size: int = 32  # S: images are 3 x S x S (16..64)
    rank: int = 32  # r: principal directions per concept
    samples_per_concept: int = 512
    noise_floor: float = 0.01  # s0: isotropic std of every concept, [-1, 1] units (small: sensor noise only)
    seed: int = 0  # the world's seed (not the run's)
    cache_dir: str = "~/.cache/sdbridge/world"

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 64:
            raise ValueError(f"prior.size={self.size} must be between 16 and 64")
        if not 1 <= self.rank < self.samples_per_concept:
            raise ValueError(f"prior.rank={self.rank} must be >= 1 and < prior.samples_per_concept")
        if not self.noise_floor > 0:
            raise ValueError(f"prior.noise_floor={self.noise_floor} must be > 0")


@dataclass
class Mixture:
    """A prompt's exact distribution: K low-rank Gaussians (float64 on the prior's device)."""

    prompt: str
    mu: torch.Tensor  # (K, D)
    U: torch.Tensor  # (K, D, r) orthonormal columns
    lam: torch.Tensor  # (K, r) >= 0
    s2: torch.Tensor  # (K,) isotropic variance
    log_pi: torch.Tensor  # (K,)
    concepts: list[tuple[str, str]]

    @property
    def num_components(self) -> int:
        return int(self.mu.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mu.shape[1])

    # ------------------------------------------------------------------ moments
    def mean(self) -> torch.Tensor:
        return (self.log_pi.exp().unsqueeze(1) * self.mu).sum(0)

    def cov_apply(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ Sigma`` for the mixture covariance Sigma (X: (n, D)), without forming Sigma (D x D)."""
        pi = self.log_pi.exp()
        m = self.mean()
        proj = torch.einsum("nd,kdr->knr", X, self.U) * self.lam.unsqueeze(1)  # (K, n, r)
        low = torch.einsum("knr,kdr->knd", proj, self.U)
        iso = self.s2.view(-1, 1, 1) * X.unsqueeze(0)
        outer = (X @ self.mu.T).T.unsqueeze(2) * self.mu.unsqueeze(1)  # (K, n, D)
        within = (pi.view(-1, 1, 1) * (low + iso + outer)).sum(0)
        return within - (X @ m).unsqueeze(1) * m.unsqueeze(0)

    def trace_cov(self) -> torch.Tensor:
        pi = self.log_pi.exp()
        m = self.mean()
        per = self.lam.sum(1) + self.dim * self.s2 + (self.mu**2).sum(1)
        return (pi * per).sum() - (m**2).sum()

    # ------------------------------------------------------------------ noised density
    def _flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached stacked bases: U_all (D, K r), U^T mu (K, r), |mu|^2 (K,)."""
        cache = getattr(self, "_flat_cache", None)
        if cache is None:
            K, D, r = self.U.shape
            U_all = self.U.permute(1, 0, 2).reshape(D, K * r).contiguous()
            Utmu = torch.einsum("kdr,kd->kr", self.U, self.mu)
            cache = (U_all, Utmu, (self.mu**2).sum(1))
            object.__setattr__(self, "_flat_cache", cache)
        return cache

    def noised_terms(self, x: torch.Tensor, abar: torch.Tensor):
        """Per-component log N(x; sqrt(abar) mu_k, Sigma_k(t)) and what the score needs.

        x: (B, D) float64, abar: (B,) float64. Everything is computed from matmuls against the stacked bases, so no
        (B, K, D) tensor is formed: with d = x - sqrt(abar) mu_k,
        ``|d|^2 = |x|^2 - 2 sqrt(abar) x.mu_k + abar |mu_k|^2`` and ``U_k^T d = U_k^T x - sqrt(abar) U_k^T mu_k``.

        Returns ``(log_prob (B, K), c (B, K), g * proj (B, K, r))``.
        """
        K, D, r = self.U.shape
        U_all, Utmu, mu2 = self._flat()
        a = abar.view(-1, 1)  # (B, 1)
        sa = a.sqrt()
        c = a * self.s2.view(1, -1) + (1 - a)  # (B, K)
        al = a.unsqueeze(2) * self.lam.unsqueeze(0)  # (B, K, r)
        g = al / (al + c.unsqueeze(2))
        proj = (x @ U_all).view(-1, K, r) - sa.unsqueeze(2) * Utmu.unsqueeze(0)  # (B, K, r)
        d2 = (x * x).sum(1, keepdim=True) - 2 * sa * (x @ self.mu.T) + a * mu2.unsqueeze(0)  # (B, K)
        maha = (d2 - (g * proj * proj).sum(2)) / c
        logdet = D * torch.log(c) + torch.log1p(al / c.unsqueeze(2)).sum(2)
        log_prob = -0.5 * (maha + logdet + D * math.log(2 * math.pi))
        return log_prob, c, g * proj

    def responsibilities(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        log_prob, _, _ = self.noised_terms(x, abar)
        return torch.softmax(log_prob + self.log_pi, dim=1)

    def log_prob(self, x: torch.Tensor, abar: torch.Tensor | None = None) -> torch.Tensor:
        """log p_t(x) (t = 0, the clean distribution, when ``abar`` is None). x: (B, D)."""
        if abar is None:
            abar = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        log_prob, _, _ = self.noised_terms(x, abar)
        return torch.logsumexp(log_prob + self.log_pi, dim=1)

    def score(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x), (B, D):

        ``-sum_k r_k Sigma_k^-1 d_k = -[ x sum_k r_k / c_k - sqrt(abar) sum_k (r_k / c_k) mu_k
        - sum_k U_k (r_k g_k proj_k / c_k) ]``
        """
        K, D, r = self.U.shape
        U_all, _, _ = self._flat()
        log_prob, c, gproj = self.noised_terms(x, abar)
        resp = torch.softmax(log_prob + self.log_pi, dim=1)  # (B, K)
        rc = resp / c
        coeff = (rc.unsqueeze(2) * gproj).reshape(-1, K * r)
        inv = x * rc.sum(1, keepdim=True) - abar.sqrt().view(-1, 1) * (rc @ self.mu) - coeff @ U_all.T
        return -inv

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n exact samples of the clean distribution, (n, D) float64 on the CPU generator's stream."""
        k = torch.multinomial(self.log_pi.exp().cpu().float(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.lam.shape[1], generator=generator, dtype=torch.float64)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        k = k.to(self.mu.device)
        z, e = z.to(self.mu), e.to(self.mu)
        low = torch.einsum("ndr,nr->nd", self.U[k], self.lam[k].sqrt() * z)
        return self.mu[k] + low + self.s2[k].sqrt().unsqueeze(1) * e


def build_mixture(world: World, parsed: ParsedPrompt, prompt: str, device: torch.device) -> Mixture:
    """Select the prompt's concepts and push each through the modifier chain (affine maps of the clean image)."""
    concepts = parsed.concepts()
    idx = torch.tensor([world.index(*c) for c in concepts])
    S = world.spec.size
    mu = world.mu[idx].double()
    W = (world.U[idx] * world.lam[idx].sqrt().unsqueeze(1)).double()  # (K, D, r): U diag(sqrt(lam))
    K, D, r = W.shape
    s2 = torch.full((K,), world.spec.noise_floor**2, dtype=torch.float64)
    for name in parsed.modifiers:
        mod = MODIFIERS[name]
        as_images = lambda v: v.reshape(-1, 3, S, S)  # noqa: E731
        offset = mod.apply(torch.zeros(1, 3, S, S, dtype=torch.float64)).reshape(1, D)
        mu = mod.apply(as_images(mu)).reshape(K, D)
        cols = mod.apply(as_images(W.transpose(1, 2).reshape(K * r, D))).reshape(K, r, D)
        W = (cols - offset.unsqueeze(0)).transpose(1, 2)  # linear part only
        s2 = s2 + mod.noise_std**2
    # Re-orthonormalize: W = Q diag(sigma) V^T  =>  W W^T = Q diag(sigma^2) Q^T
    Q, sigma, _ = torch.linalg.svd(W, full_matrices=False)
    log_pi = torch.full((K,), -math.log(K), dtype=torch.float64)
    return Mixture(prompt, mu.to(device), Q.contiguous().to(device), (sigma**2).to(device), s2.to(device),
                   log_pi.to(device), concepts)


class AnalyticPrior(DiffusionPrior):
    """Exact pixel-space prior (``prior=analytic``). ``sample_shape = (3, S, S)``; x0 in [-1, 1]."""

    is_latent = False

    def __init__(self, config: AnalyticConfig | None = None):
        super().__init__()
        self.config = config or AnalyticConfig()
        spec = WorldSpec(self.config.size, self.config.rank, self.config.samples_per_concept,
                         self.config.noise_floor, self.config.seed)
        self.world = load_world(spec, self.config.cache_dir)
        self.to(resolve_device(self.config.device))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.config.size, self.config.size)

    # ------------------------------------------------------------------ text = exact distributions
    def _encode_prompts(self, prompts: list[str]) -> list[Mixture]:
        return [build_mixture(self.world, parse_prompt(p), p, self.device) for p in prompts]

    def mixture(self, prompt: str) -> Mixture:
        """The exact clean distribution of ``prompt`` (cached)."""
        return self.encode_text([prompt]).value[0]

    # ------------------------------------------------------------------ denoiser
    def _predict_eps_batched(self, x_t: torch.Tensor, t: torch.Tensor, conds: list[TextEmbedding]) -> torch.Tensor:
        B = x_t.shape[0]
        x = x_t.reshape(B, -1).double()
        abar = self.alphas_cumprod[t.to(self.device)]
        out = torch.empty(len(conds), B, x.shape[1], dtype=torch.float64, device=x.device)
        for j, cond in enumerate(conds):
            # group the batch by prompt: each distinct prompt's mixture is evaluated once on its samples
            groups: dict[int, list[int]] = {}
            first: dict[str, int] = {}
            for i, p in enumerate(cond.prompts):
                groups.setdefault(first.setdefault(p, i), []).append(i)
            for head, rows in groups.items():
                mix: Mixture = cond.value[head]
                rows_t = torch.tensor(rows, device=x.device)
                out[j, rows_t] = -(1 - abar[rows_t]).sqrt().unsqueeze(1) * mix.score(x[rows_t], abar[rows_t])
        return out.float().reshape(len(conds), *x_t.shape)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompt: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of ``prompt``'s clean distribution, ``(n, 3, S, S)`` in model units."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return self.mixture(prompt).sample(n, gen).float().reshape(n, *self.sample_shape)

    @torch.no_grad()
    def sample_x_T(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Exact samples of p_T (t = 999) for each prompt: sqrt(abar_T) x0 + sqrt(1 - abar_T) eps.

        SD's schedule ends at abar_T = 0.0047, not 0, so N(0, I) is not p_T: for this world the KL between them is
        0.5 * abar_T * |mu|^2, several nats, and a deterministic DDIM run from N(0, I) carries that error to t = 0.
        The exact prior knows p_T, so its samplers start there.
        """
        if isinstance(generator, SampleGenerators):  # independent samples: each from its own generator
            generator.check(len(prompts))
            return torch.cat([self.sample_x_T([p], g) for p, g in zip(prompts, generator.generators)])
        a_T = self.alphas_cumprod[-1].float()
        x0 = torch.cat([self.sample(p, 1, generator) for p in prompts])
        return a_T.sqrt() * x0 + (1 - a_T).sqrt() * torch.randn(x0.shape, generator=generator).to(x0)

    # ------------------------------------------------------------------ sample space
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, (size, size), mode="bilinear", antialias=True, align_corners=False)
        return 2 * images - 1

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)
