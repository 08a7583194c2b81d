"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE=1, W&B offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdbridge.priors.base import DiffusionPrior, TextEmbedding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


class StubPrior(DiffusionPrior):
    """A prior whose eps is a known function, so guidance gradients can be checked by hand.

    ``eps(x_t, t, prompt) = a(prompt) * x_t + t / 1000``, with ``a(prompt) = 0.1 * (1 + len(prompt) % 7)``.
    Pixel space, samples ``(3, 4, 4)``.
    """

    def __init__(self, shape=(3, 4, 4)):
        super().__init__()
        self._shape = tuple(shape)
        self.encoded: list[str] = []

    @property
    def sample_shape(self):
        return self._shape

    @staticmethod
    def coef(prompt: str) -> float:
        return 0.1 * (1 + len(prompt) % 7)

    def eps_by_hand(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        a = torch.tensor([self.coef(p) for p in prompts]).view(-1, 1, 1, 1)
        return a * x_t + t.view(-1, 1, 1, 1).float() / 1000

    def _encode_prompts(self, prompts):
        self.encoded.extend(prompts)
        return [torch.tensor(self.coef(p)) for p in prompts]

    def _predict_eps_batched(self, x_t, t, conds: list[TextEmbedding]):
        return torch.stack([self.eps_by_hand(x_t, t, c.prompts) for c in conds])

    def encode(self, images):
        return 2 * images - 1

    def decode(self, x0):
        return ((x0 + 1) / 2).clamp(0, 1)


@pytest.fixture
def stub_prior() -> StubPrior:
    return StubPrior()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One tiny-SD cache folder for the whole session (built once, ~5 s)."""
    return tmp_path_factory.mktemp("tiny_sd_cache")


@pytest.fixture(scope="session")
def tiny_prior(tiny_cache):
    from sdbridge.priors.tiny import TinySDConfig, TinySDPrior

    return TinySDPrior(TinySDConfig(cache_dir=str(tiny_cache), device="cpu"))


def compose(overrides: Sequence[str] = ()):
    """Compose ``conf/config.yaml`` with overrides, as ``python run.py`` would (without running)."""
    from sdbridge.eval.protocol import compose_config

    return compose_config(overrides)


def run_cli(args: Sequence[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """``python run.py <args>`` in a subprocess; returns the CompletedProcess (stdout+stderr in .stdout)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=str(cwd or ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("world_cache")


@pytest.fixture(scope="session")
def analytic_prior(world_cache):
    """The default exact prior (32 x 32), built once per session."""
    from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior

    return AnalyticPrior(AnalyticConfig(cache_dir=str(world_cache), device="cpu"))


@pytest.fixture(scope="session")
def small_analytic_prior(world_cache):
    """A 16 x 16 exact prior (D = 768) where dense linear algebra is cheap enough to cross-check."""
    from sdbridge.priors.analytic import AnalyticConfig, AnalyticPrior

    return AnalyticPrior(AnalyticConfig(size=16, clusters=4, rank=4, coarse_clusters=2, coarse_rank=3,
                                        renders_per_cluster=24, precision="float64", cache_dir=str(world_cache),
                                        device="cpu"))


def dense_components(mix):
    """The mixture's components as dense tensors: means (K, D), covariances (K, D, D), log weights (K,), for
    cross-checks on a small prior (the order is ``mix.sets``, then (geometry, color) as in the responsibilities, then
    the generic component)."""
    means, covs, logw = [], [], []
    for s, lp, amp in zip(mix.sets, mix.log_pi, mix.amps):
        geo = s.geo
        P = geo.mu.shape[1]
        eye = torch.eye(3 * P, dtype=torch.float64)
        for g in range(geo.num):
            for c in range(s.colors):
                means.append((s.beta.view(3, 1) + amp[g, c] * s.delta[c].view(3, 1) * geo.mu[g].view(1, P)).reshape(-1))
                U = torch.kron(s.dhat[c].view(3, 1), geo.Q[g])  # (3 P, r)
                covs.append((U * (s.dnorm[c] ** 2 * geo.lam[g])) @ U.T + s.s2 * eye)
                logw.append(lp[g, c])
    if mix.generic is not None:  # last, as in the responsibilities
        gen = mix.generic
        means.append(gen.m)
        covs.append((gen.V * gen.lam) @ gen.V.T + gen.s2 * torch.eye(gen.dim, dtype=torch.float64))
        logw.append(torch.tensor(mix.log_generic, dtype=torch.float64))
    return torch.stack(means), torch.stack(covs), torch.stack(logw)
