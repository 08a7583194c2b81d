"""The interface every diffusion prior implements.

A prior is a pretrained (or exact) epsilon-predictor together with its noise schedule and the map between the
target's images and the model's sample space:

    images in [0, 1]  --encode-->  x0 (model space: SD latents, or pixels in [-1, 1])  --decode-->  images

Conventions (the README's section on the one formula uses them):

* ``alphas_cumprod`` is owned by the prior: 1000 steps, Stable Diffusion's scaled-linear betas 0.00085 -> 0.012.
* ``predict_eps(x_t, t, conds)`` evaluates several conditionings in **one** batched call and returns a tensor of
  shape ``(k, B, *sample_shape)``; every call adds ``k`` to :attr:`DiffusionPrior.nfe` (NFEs are counted per
  sample, so a batch of B images evaluated with k conditionings costs k NFEs, as in the papers' accounting).
  ``predict_eps(x_t, t, conds, weights)`` returns weighted sums of them instead (CFG is one): a prior that can
  (``combines_linearly``: the exact prior) combines before its most expensive step, any other combines the
  predictions (:func:`combine_eps`), so both give the same values.
* Predictions are always epsilon; v-prediction models are converted inside the prior.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from sdbridge import rng
from sdbridge.views import TextMix

NUM_TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """Stable Diffusion's schedule: betas linear in sqrt-space from ``beta_start`` to ``beta_end``.

    Returns ``alphas_cumprod`` of shape ``(num_steps,)`` in float64 (callers cast where needed).
    Matches diffusers' ``DDPMScheduler(beta_schedule="scaled_linear")`` with SD's config.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class TextEmbedding:
    """A batch of encoded prompts, one per sample; opaque to guidances.

    ``value`` is prior-specific (token embeddings ``(B, L, C)`` for Stable Diffusion, parsed distributions for the
    exact prior); ``prompts`` keeps the texts for logging and error messages.
    """

    value: Any
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PriorConfig:
    """Fields shared by every prior config."""

    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (fp16 on GPU, fp32 on CPU), "float32", "float16", "bfloat16"


def combine_eps(eps: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_j w_j eps_j``. When the weights sum to 1 it is computed as ``eps_0 + sum_{j>0} w_j (eps_j - eps_0)``
    (``eps_0``: the first with a nonzero weight), so CFG's ``[1 - s, s]`` gives ``eps_u + s (eps_c - eps_u)`` bit for
    bit, and a single weight of 1 gives that prediction itself."""
    terms = [(w, e) for w, e in zip(weights, eps) if w != 0]
    if not terms:
        return torch.zeros_like(eps[0])
    if abs(sum(w for w, _ in terms) - 1) > 1e-12:
        return sum((w * e for w, e in terms[1:]), terms[0][0] * terms[0][1])
    base = terms[0][1]
    for w, e in terms[1:]:
        base = base + w * (e - terms[0][1])
    return base


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` (B,) shaped to broadcast against ``like`` (B, ...): one value per sample."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def attach_prior(module: nn.Module, prior: "DiffusionPrior") -> None:
    """``module.prior = prior`` without registering it as a submodule: the prior is shared (its weights are not part
    of the module's state, parameters or device moves)."""
    object.__setattr__(module, "prior", prior)


def available_devices() -> list[str]:
    """The ``prior.device`` values that work on this machine (``auto`` first)."""
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str) -> torch.device:
    """``prior.device`` as a torch device; a value torch cannot parse, or a device this machine lacks, is a
    ``ValueError`` that lists the values available here (checked before a run writes anything)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"prior.device={device!r} is not a device torch knows; use one of: {here}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"prior.device={device!r} but CUDA is not available here; use prior.device=cpu or auto "
                         f"(available here: {here})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"prior.device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use one of: {here}")
    if dev.type == "mps" and "mps" not in available_devices():
        raise ValueError(f"prior.device={device!r} but MPS is not available here; use one of: {here}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"prior.device={device!r}: sdbridge runs on cpu, cuda or mps; use one of: {here}")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"prior.dtype={dtype!r} is not one of {['auto', *table]}")
    return table[dtype]


class DiffusionPrior(nn.Module, abc.ABC):
    """Base class: schedule, NFE counter, text-embedding cache, and the CFG-batched eps call.

    Subclasses implement :meth:`_encode_prompts`, :meth:`_predict_eps_batched`, :meth:`encode`, :meth:`decode`
    and :attr:`sample_shape`.
    """

    #: True when x0 lives in a latent space (so pixel targets are VAE-encoded and latents can be optimized directly).
    is_latent: bool = False
    #: True when the prior knows its true distributions in closed form: exact samples (``sample(prompt, n, g)``) and
    #: exact log-densities, so a run can be scored by exact metrics against them (the exact world); a trained
    #: network cannot be.
    has_true_distribution: bool = False
    #: True when LoRA adapters can be put on the denoiser (``add_lora``, ``adapter``, ``predict_raw``: Stable
    #: Diffusion); VSD's source is then a LoRA, else a residual network over the prior's prediction.
    supports_adapters: bool = False
    #: True when a conditioning can be a weighted sum of two texts' embeddings (:class:`TextMix`: token embeddings of
    #: Stable Diffusion); the exact prior's texts are distributions, so a mix of two is not defined there.
    interpolates_text: bool = False
    #: True when a weighted sum of several conditionings' eps costs less from one call than from the predictions
    #: apart (``_predict_eps_batched(..., weights)``): the exact prior's eps is linear in per-conditioning low-rank
    #: coefficients, so a CFG pair back-projects once instead of twice.
    combines_linearly: bool = False

    def __init__(self, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        ac = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.to(torch.float64)
        # float64 master copy; guidances index it and cast to the sample dtype.
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        self._nfe = [0]  # one cell, shared with companion models (:meth:`share_nfe_counter`)
        self._text_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ NFE accounting (the one place it happens)
    @property
    def nfe(self) -> int:
        """Denoiser evaluations so far, one per batch and conditioning (a companion model's count here too)."""
        return self._nfe[0]

    @nfe.setter
    def nfe(self, value: int) -> None:
        self._nfe[0] = int(value)

    def share_nfe_counter(self, other: "DiffusionPrior") -> None:
        """``other``'s evaluations count as this prior's (a second model serving the same run, e.g. VSD's LoRA)."""
        other._nfe = self._nfe

    @contextlib.contextmanager
    def uncounted(self):
        """Evaluations inside are not NFEs of the guidance: the training passes of its own network (VSD), whose
        cost is in the step time and is reported beside the NFEs (the method table's "+1 training pass")."""
        before = self.nfe
        try:
            yield
        finally:
            self.nfe = before

    # ------------------------------------------------------------------ properties
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one model-space sample x0, e.g. ``(4, 64, 64)`` for SD 2.1 base."""

    @property
    def image_size(self) -> int:
        """Side of the images that :meth:`encode` expects and :meth:`decode` returns."""
        return int(self.sample_shape[-1])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """``alphas_cumprod[t]`` (float64) for integer timesteps ``t``; a negative t reads ``alphas_cumprod[0]``.

        threestudio's SDI starts its DDIM inversion one grid step below the first grid point (t = 1 - 100 = -99) with
        the scheduler's ``initial_alpha_cumprod``, which is ``alphas_cumprod[0]`` for Stable Diffusion's schedulers
        (``set_alpha_to_one=False``); the UNet sees t = -99 as it is."""
        return self.alphas_cumprod[torch.as_tensor(t, device=self.device).long().clamp(min=0)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process on this prior's schedule: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        abar = per_sample(self.abar(t), x0).to(x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022), the v-prediction training target."""
        abar = per_sample(self.abar(t), x0).to(x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def eps_to_v(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v of an eps prediction at x_t: (eps - sqrt(1 - abar_t) x_t) / sqrt(abar_t), so that
        ``eps_to_v(eps) - v_target(x0, noise)`` = (eps - noise) / sqrt(abar_t)."""
        abar = per_sample(self.abar(t), x_t).to(x_t)
        return (eps - (1 - abar).sqrt() * x_t) / abar.sqrt()

    def eps_to_x0(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 prediction of an eps prediction at x_t: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), the inverse of
        :meth:`add_noise` in x0."""
        abar = per_sample(self.abar(t), x_t).to(x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    # ------------------------------------------------------------------ text
    def encode_text(self, prompts: Sequence[str | TextMix]) -> TextEmbedding:
        """Encode a list of prompts (one per sample). Each distinct string is encoded once per run (cached); a
        :class:`TextMix` is the mix of its two cached encodings (a mix of one text with itself is that text)."""
        prompts = [p if isinstance(p, TextMix) else str(p) for p in prompts]
        texts = [t for p in prompts for t in ((p.a, p.b) if isinstance(p, TextMix) else (p,))]
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            for p, v in zip(missing, self._encode_prompts(missing)):
                self._text_cache[p] = v
        return TextEmbedding(self._stack([self._text_value(p) for p in prompts]), [str(p) for p in prompts])

    def _text_value(self, prompt: str | TextMix) -> Any:
        if not isinstance(prompt, TextMix):
            return self._text_cache[prompt]
        if prompt.r == 1 or self.same_conditioning(prompt.a, prompt.b):
            return self._text_cache[prompt.a]
        if prompt.r == 0:
            return self._text_cache[prompt.b]
        if not self.interpolates_text:
            raise TypeError(f"{type(self).__name__} cannot mix two texts' embeddings ({prompt}); "
                            "interpolate the two predictions instead")
        return prompt.r * self._text_cache[prompt.a] + (1 - prompt.r) * self._text_cache[prompt.b]

    def same_conditioning(self, a: str, b: str) -> bool:
        """Whether texts ``a`` and ``b`` condition the prior identically (so any mix of them is either)."""
        return a == b

    @abc.abstractmethod
    def _encode_prompts(self, prompts: list[str]) -> list[Any]:
        """Encode distinct prompts; returns one (unbatched) embedding per prompt."""

    def _stack(self, values: list[Any]) -> Any:
        """Combine per-prompt embeddings into one batch value (tensors are stacked, others kept as a list)."""
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values)
        return list(values)

    # ------------------------------------------------------------------ denoiser
    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, conds: Sequence[TextEmbedding],
                    weights: Sequence[Sequence[float]] | None = None) -> torch.Tensor:
        """Epsilon for each conditioning in one batched call (or ``weights``' sums of them).

        Args:
            x_t: noisy samples ``(B, *sample_shape)``.
            t: integer timesteps ``(B,)`` in ``[0, num_train_timesteps)`` (or a negative one, read as t = 0 by
                the noise level: :meth:`abar`).
            conds: ``k`` text embeddings, each of batch ``B``.
            weights: ``m`` rows of ``k`` weights: the result is then the ``m`` sums ``sum_j w_j eps_j``
                (:func:`combine_eps`; CFG is ``[[1 - s, s]]`` over ``[uncond, cond]``).

        Returns:
            ``(k, B, *sample_shape)`` (or ``(m, B, ...)``) float32 epsilon predictions. Adds ``k`` to :attr:`nfe`:
            a sum costs the evaluations it is made of.
        """
        if x_t.shape[1:] != tuple(self.sample_shape):
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}, expected (B, {', '.join(map(str, self.sample_shape))})")
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        for c in conds:
            if len(c) != B:
                raise ValueError(f"conditioning has {len(c)} prompts for a batch of {B} samples")
        if weights is not None:
            weights = [[float(w) for w in row] for row in weights]
            if not weights or any(len(row) != len(conds) for row in weights):
                raise ValueError(f"weights must be rows of {len(conds)} numbers (one per conditioning), got {weights}")
        if weights is not None and self.combines_linearly:
            eps = self._predict_eps_batched(x_t, t, list(conds), weights)
        else:
            eps = self._predict_eps_batched(x_t, t, list(conds))
            if weights is not None:
                eps = torch.stack([combine_eps(eps.unbind(0), row) for row in weights])
        self.nfe += len(conds)
        return eps

    @abc.abstractmethod
    def _predict_eps_batched(self, x_t: torch.Tensor, t: torch.Tensor, conds: list[TextEmbedding]) -> torch.Tensor:
        """Return ``(k, B, *sample_shape)`` eps; called by :meth:`predict_eps` (which counts NFEs). A prior with
        ``combines_linearly`` also takes ``weights`` (``m`` rows of ``k`` floats) and returns their ``m`` sums."""

    @torch.no_grad()
    def sample_x_T(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Starting points for samplers at t = T - 1: N(0, I) (priors that know p_T exactly override this)."""
        return rng.randn((len(prompts), *self.sample_shape), generator).to(self.device)

    # ------------------------------------------------------------------ sample space
    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] to model-space x0, differentiably."""

    def encode_sample(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A draw from the encoder's posterior of ``images`` (threestudio's ``latent_dist.sample()``); a prior
        whose encoder is deterministic (the exact prior's affine map) returns :meth:`encode`."""
        return self.encode(images)

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space x0 to images ``(B, 3, H, W)`` in [0, 1]."""

    def extra_repr(self) -> str:
        return f"sample_shape={tuple(self.sample_shape)}, latent={self.is_latent}"
