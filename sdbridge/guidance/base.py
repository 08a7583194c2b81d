"""The one formula every score-distillation method is an instance of.

For a model-space sample x0 (an SD latent or a pixel image), timestep t and noise kappa::

    x_t  = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * kappa
    grad = w(t) * ( eps_tgt(x_t, t) - eps_src(x_t, t) )          # the gradient on x0

and the target is optimized through the surrogate loss ``0.5 * ||x0 - stopgrad(x0 - grad)||^2`` (summed over the
batch, so each sample's gradient is exactly its own ``grad`` whatever the batch size).

A method subclasses :class:`Guidance` and overrides only what differs from SDS, in four pluggable parts:

* **how x_t is made** (:meth:`Guidance.make_x_t`): fresh noise (default), DDIM inversion (SDI, ISM), a cached
  previous prediction (2D exact SDI);
* **eps_tgt** (:meth:`Guidance.target_texts` + :meth:`Guidance.target_weights`, a weighted sum of their
  predictions, or :meth:`Guidance.target_from` where it is not one): CFG for the prompt by default;
* **eps_src** (:meth:`Guidance.source_texts` + :meth:`Guidance.source_from`): the noise kappa by default;
* **w(t)** and the t schedule (config).

All conditionings that eps_tgt and eps_src need at one x_t are evaluated in **one** batched denoiser call.
"Full bridge" (``full_bridge=true``) is the multi-step limit of the same formula: PF-ODE (DDIM, eta 0) inversion of
x0 to t with eps_src, then PF-ODE generation back to 0 with eps_tgt; the gradient is x0 minus the result.
Noising, CFG, batching, weighting, the loss trick, NaN checks and NFE accounting live here.

**CFG convention** (for every method in sdbridge): ``eps = eps_uncond + s * (eps_cond - eps_uncond)``, the
diffusers convention. threestudio's SDS writes ``eps_cond + s' * (eps_cond - eps_uncond)``, i.e. ``s = s' + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence, TypeVar

import torch
from torch import nn

from sdbridge import rng
from sdbridge.guidance.perp_neg import perp_neg_guidance
from sdbridge.priors.base import DiffusionPrior, attach_prior, combine_eps, per_sample
from sdbridge.sampling import cfg_weights, classifier_free_guidance, ddim_step, inversion_path, timestep_path
from sdbridge.schedules import TimestepSchedule
from sdbridge.views import StepPrompts, ViewPrompting, Views


E = TypeVar("E", bound=Enum)

LOSS_REDUCTIONS = ("sum", "mean")
TARGET_SUM = "eps_tgt"  # the name of eps_tgt's weighted sum among ``predict``'s results


def cfg_sum(scale: float, uncond: str = "uncond", cond: str = "cond") -> dict[str, float]:
    """CFG at ``scale`` as the weights of two named predictions (``Guidance.predict``'s ``combine``)."""
    return dict(zip((uncond, cond), cfg_weights(scale)))


class BridgeGrid(Enum):
    """The DDIM timesteps of the full bridge's two PF-ODEs (no official code fixes them; the paper says only that the
    bridge takes "dozens of NFEs")."""

    per_sample = "bridge_steps evenly spaced steps between 0 and each sample's t (sdbridge before 2026-12-07)"
    fixed = ("the grid {0, 1000 / bridge_steps, ...} below each sample's t, then t: a fixed step size, as SDI's and "
             "ISM's official inversions; a sample at a small t takes fewer steps")


class Weighting(Enum):
    """w(t) choices. ``one_minus_abar`` is DreamFusion's default; ``sigma`` = sqrt((1 - abar) / abar) turns
    ``w * (eps_hat - kappa)`` into the x0-prediction residual ``x0 - x0_hat`` (SDI's loss)."""

    one_minus_abar = "1 - abar_t"
    sigma = "sqrt((1 - abar_t) / abar_t)"
    uniform = "1"


@dataclass
class GuidanceConfig:
    """Fields shared by every guidance."""

    scale: float = 7.5  # CFG scale s in eps_u + s * (eps_c - eps_u)
    weighting: Weighting = Weighting.one_minus_abar
    negative_prompt: str = ""  # the "unconditional" text of CFG
    full_bridge: bool = False  # PF-ODE inversion with eps_src + generation with eps_tgt instead of one step
    #: DDIM steps of each PF-ODE in full-bridge mode (per_sample), or over [0, 1000) (fixed). No official code fixes
    #: them; the Bridge paper (McAllister et al. 2024, project page, "First-Order Approximation Error") says the two
    #: PF-ODEs take "dozens of NFEs": 8 steps of source (1) + CFG target (2) are 24, the fewest that make dozens.
    #: Against 10 (sdbridge before 2026-12-07) the round-trip error on the exact prior is 1.0-1.2x and a VSD + full
    #: bridge step ~0.8x the time (experiments/exact/README.md)
    bridge_steps: int = 8
    bridge_grid: BridgeGrid = BridgeGrid.per_sample
    #: how the surrogate loss reduces, i.e. the scale of the gradient the target receives. "sum": the gradient is
    #: ``grad`` itself (the SDS-Bridge 2D code and LucidDreamer apply it directly; threestudio's SDS and VSD losses
    #: ``0.5 mse(sum) / B`` at batch 1); "mean": threestudio SDI's ``0.5 mse(mean) / B``, gradient
    #: ``grad / (B * numel)`` with numel the whole batch's elements, which sets the guidance's weight against the
    #: regularizers of its 3D config (``experiment=nerf_sdi``). Adam nearly ignores it when nothing else is summed.
    loss_reduction: str = "sum"

    def __post_init__(self) -> None:
        if self.bridge_steps < 1:
            raise ValueError(f"guidance.bridge_steps={self.bridge_steps} must be >= 1")
        if not math.isfinite(self.scale):
            raise ValueError(f"guidance.scale={self.scale} must be a finite number")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"guidance.loss_reduction={self.loss_reduction!r} is not one of {list(LOSS_REDUCTIONS)}")
        self.weighting = as_enum(Weighting, self.weighting, "guidance.weighting")
        self.bridge_grid = as_enum(BridgeGrid, self.bridge_grid, "guidance.bridge_grid")


def as_enum(kind: type[E], value: Any, key: str) -> E:
    """``value`` as a member of ``kind``; a member's name also works (plain construction from Python)."""
    if isinstance(value, kind):
        return value
    try:
        return kind[str(value)]
    except KeyError:
        raise ValueError(f"{key}={value!r} is not one of {[m.name for m in kind]}") from None


@dataclass
class GuidanceOutput:
    """What one guidance evaluation returns.

    Attributes:
        grad: ``(B, *sample_shape)`` gradient on x0 (already weighted).
        loss: scalar surrogate loss whose gradient w.r.t. x0 is ``grad``.
        t: ``(B,)`` timesteps used.
        noise: ``(B, *sample_shape)`` the noise kappa that made x_t (drawn, given, inverted or cached).
        nfe: denoiser evaluations this call made (per sample).
        extras: method-specific tensors (e.g. ``eps_tgt``, ``eps_src``) for logging and tests.
    """

    grad: torch.Tensor
    loss: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    nfe: int
    extras: dict[str, Any] = field(default_factory=dict)


class NonFiniteGradientError(FloatingPointError):
    """The guidance produced NaN or Inf; raised instead of silently corrupting the optimized target."""


def bridge_path(t: torch.Tensor, steps: int, grid: BridgeGrid, num_train_timesteps: int = 1000) -> list[torch.Tensor]:
    """The full bridge's timesteps, a list of (B,) tensors from 0 (the clean sample) to t. ``per_sample``: ``steps``
    evenly spaced steps to each sample's t; ``fixed``: 0, the points of the grid ``{k num_train_timesteps / steps}``
    below t, then t, padded at the start with 0 (no move) to the longest path of the batch (SDI's inversion grid
    without its offset)."""
    if grid is BridgeGrid.per_sample:
        return timestep_path(t, steps)
    return inversion_path(t, steps, num_train_timesteps, offset=0)


def prompt_rows(prompts: Sequence[str], rows: list[int]) -> "StepPrompts | None":
    """The prompts of the samples ``rows`` (a sub-batch), or None when the step's prompts carry cameras or Perp-Neg
    views, which are not split."""
    p = StepPrompts.of(prompts)
    if p.views is not None or p.perp_neg is not None:
        return None
    return StepPrompts([p[i] for i in rows], plain=[p.plain[i] for i in rows], prompting=p.prompting)


def surrogate_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||x0 - stopgrad(x0 - grad)||^2``: its gradient with respect to x0 is exactly ``grad``."""
    target = (x0 - grad).detach()
    return 0.5 * ((x0 - target) ** 2).sum()


class Guidance(nn.Module):
    """Base class of all guidances; see the module docstring for the formula.

    ``SUMMARY`` describes the method's parts for the README's method table (``sdbridge.eval.method_table``).

    Args:
        config: the method's config dataclass.
        prior: the diffusion prior (owns the schedule, the text encoder and the denoiser).
        schedule: the timestep schedule used when ``t`` is not given.
        generator: the run's seeded CPU generator; all randomness (t, noise) is drawn from it.
        view_prompting: how the views a 3D target passes to :meth:`forward` change the texts (view-dependent
            prompts, Perp-Neg); off by default (image targets pass no views).

    Every part below receives the step's prompts as :class:`~sdbridge.views.StepPrompts` (a list of the texts to
    condition on, with the step's ``views``, ``plain`` view-independent prompts and ``perp_neg`` conditionings).
    """

    def __init__(
        self,
        config: GuidanceConfig,
        prior: DiffusionPrior,
        schedule: TimestepSchedule,
        generator: torch.Generator | None = None,
        view_prompting: ViewPrompting | None = None,
    ):
        super().__init__()
        self.config = config
        # Not registered as a submodule: the prior is shared and must not land in the guidance's state_dict.
        attach_prior(self, prior)
        self.schedule = schedule
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.max_steps = 1
        self.view_prompting = view_prompting or ViewPrompting()

    def setup(self, max_steps: int, initial_noise: torch.Tensor | None = None) -> None:
        """Called once the trainer's real ``max_steps`` is known. ``initial_noise``: the eps prediction the target's
        initialization came from (``Target.initial_noise``), for methods whose first kappa is that prediction."""
        self.max_steps = max(1, int(max_steps))
        self.schedule.setup(self.max_steps)
        if self.config.full_bridge and not any(self.has_model_source(s) for s in (0, self.max_steps - 1)):
            raise ValueError(
                f"guidance.full_bridge=true needs a model source, but {type(self).__name__}'s eps_src is the noise "
                "itself (use csd, nfsd, bridge or vsd)"
            )

    def texts(self, prompts: Sequence[str]) -> list[list[str]]:
        """Every text list this guidance conditions on for ``prompts``, at any step."""
        steps = {0, self.max_steps - 1, *self.text_change_steps()}
        found: dict[tuple[str, ...], None] = {}
        for step in sorted(steps):
            for group in (self.target_texts(prompts, step), self.source_texts(prompts, step)):
                for batch in group.values():
                    found[tuple(batch)] = None
        return [list(b) for b in found]

    def text_change_steps(self) -> list[int]:
        """Steps at which the conditioning texts change (Bridge's stage switch); used by :meth:`texts`."""
        return []

    def prepare(self, prompts: Sequence[str]) -> None:
        """Encode every text once before training (each view direction's, for 3D targets): fills the embedding cache
        and fails early on bad prompts."""
        for resolved in self.view_prompting.every_view(prompts):
            for batch in self.texts(resolved):
                self.prior.encode_text(batch)

    # ------------------------------------------------------------------ trainable parts and state
    #: whether :meth:`train_step` runs before the target's optimizer step, i.e. on the very samples the gradient was
    #: computed on (the official VSD codes), rather than after it (an image target's updated image)
    train_before_target_step: bool = True

    def train_step(self, x0: torch.Tensor, prompts: Sequence[str], step: int, *,
                   views: Views | None = None) -> dict[str, float | torch.Tensor]:
        """Update trainable parts (VSD's source network) on the detached current samples seen from ``views``;
        returns log values (0-d tensors are read only on the steps that log them)."""
        return {}

    def get_extra_state(self) -> dict[str, Any]:
        """Method state that must survive a resume (cached predictions, trainable networks, their optimizers)."""
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ building blocks
    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` reshaped to broadcast against ``like``."""
        return per_sample(self.prior.abar(t), like).to(like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.prior.add_noise(x0, noise, t)

    def weighting(self, step: int | None) -> Weighting:
        """w(t)'s kind at ``step`` (the config's; a method with stages may change it)."""
        return self.config.weighting

    def weight(self, t: torch.Tensor, like: torch.Tensor, step: int | None = None) -> torch.Tensor:
        abar = self.alpha_bar(t, like)
        w = self.weighting(step)
        if w is Weighting.one_minus_abar:
            return 1 - abar
        if w is Weighting.sigma:
            return ((1 - abar) / abar).sqrt()
        return torch.ones_like(abar)

    def sample_noise(self, x0: torch.Tensor) -> torch.Tensor:
        return rng.randn(x0.shape, self.generator).to(x0)

    def sample_timesteps(self, step: int, batch_size: int) -> torch.Tensor:
        return self.schedule(step, batch_size, self.generator)

    def negatives(self, prompts: Sequence[str]) -> list[str]:
        return [self.config.negative_prompt] * len(prompts)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, *, combine: dict[str, dict[str, float]] | None = None,
                keep: Sequence[str] | None = None, **texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Evaluate the prior for several named conditionings in one batched denoiser call.

        ``self.predict(x_t, t, uncond=negs, cond=prompts)`` returns ``{"uncond": eps_u, "cond": eps_c}``.
        ``combine``: named weighted sums of them, e.g. ``{"tgt": {"uncond": 1 - s, "cond": s}}`` (CFG); the result
        then holds these sums and the conditionings named in ``keep`` (default: none). The exact prior computes a sum
        at the cost of one conditioning's back-projection (``combines_linearly``).
        """
        names = list(texts)
        conds = [self.prior.encode_text(list(texts[n])) for n in names]
        if combine is None:
            return dict(zip(names, self.prior.predict_eps(x_t, t, conds).unbind(0)))
        outputs = list(keep or ())
        rows = [[float(n == k) for n in names] for k in outputs]
        for out, weights in combine.items():
            unknown = set(weights) - set(names)
            if unknown:
                raise ValueError(f"{type(self).__name__}: the sum {out!r} weights {sorted(unknown)}, not among the "
                                 f"evaluated conditionings {names}")
            rows.append([float(weights.get(n, 0.0)) for n in names])
            outputs.append(out)
        return dict(zip(outputs, self.prior.predict_eps(x_t, t, conds, weights=rows).unbind(0)))

    # ------------------------------------------------------------------ the four parts (override what differs)
    def make_x_t(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prompts: Sequence[str], step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """How x_t is made. Returns ``(x_t, t, kappa)``; t may differ from the scheduled one (SDI's jitter)."""
        return self.add_noise(x0, noise, t), t, noise

    def target_texts(self, prompts: Sequence[str], step: int) -> dict[str, list[str]]:
        """Named conditionings eps_tgt needs (all evaluated with the source's in one batched call)."""
        perp_neg = StepPrompts.of(prompts).perp_neg
        if perp_neg is not None:
            return {"uncond": self.negatives(prompts), **perp_neg.texts(self.prior.interpolates_text)}
        return {"uncond": self.negatives(prompts), "cond": list(prompts)}

    def target_weights(self, prompts: Sequence[str], step: int) -> dict[str, float] | None:
        """eps_tgt as a weighted sum of the :meth:`target_texts`' predictions (default: CFG, ``{"uncond": 1 - s,
        "cond": s}``), or None where it is not one (Perp-Neg views: :meth:`target_from`)."""
        if StepPrompts.of(prompts).perp_neg is not None:
            return None
        return cfg_sum(self.config.scale)

    def target_from(self, eps: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str],
                    step: int) -> torch.Tensor:
        """eps_tgt from the predictions: Perp-Neg when the step's prompts carry Perp-Neg views (where
        :meth:`target_weights` is None), else :meth:`target_weights`' sum of them."""
        perp_neg = StepPrompts.of(prompts).perp_neg
        if perp_neg is not None:
            return perp_neg_guidance(eps, perp_neg, self.config.scale)
        weights = self.target_weights(prompts, step)
        if weights is None:
            raise TypeError(f"{type(self).__name__}.target_weights is None without Perp-Neg views: a method whose "
                            "eps_tgt is not a weighted sum of its predictions must override target_from")
        return combine_eps([eps[name] for name in weights], list(weights.values()))

    def source_texts(self, prompts: Sequence[str], step: int) -> dict[str, list[str]]:
        return {}

    def has_model_source(self, step: int) -> bool:
        """Whether eps_src at ``step`` is a model prediction (full bridge possible) rather than the noise itself."""
        return bool(self.source_texts([""], step))

    def source_from(
        self,
        eps: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        kappa: torch.Tensor | None,
        prompts: Sequence[str],
        step: int,
    ) -> torch.Tensor:
        """eps_src (default: the noise kappa itself, as in SDS)."""
        if kappa is None:
            raise ValueError(
                f"{type(self).__name__}'s eps_src is the noise itself, which has no PF-ODE: full_bridge needs a "
                "model source (csd, nfsd, bridge, vsd)"
            )
        return kappa

    # ------------------------------------------------------------------ the formula
    def estimate(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        kappa: torch.Tensor | None,
        prompts: Sequence[str],
        step: int,
        parts: tuple[str, ...] = ("tgt", "src"),
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(eps_tgt, eps_src)`` at x_t from one batched call over every conditioning the requested parts need."""
        texts: dict[str, list[str]] = {}
        keep: list[str] = []  # the conditionings needed apart (not only in eps_tgt's weighted sum)
        weights = self.target_weights(prompts, step) if "tgt" in parts else None
        if "tgt" in parts:
            texts.update(self.target_texts(prompts, step))
            if weights is None:
                keep += list(texts)
        if "src" in parts:
            for name, batch in self.source_texts(prompts, step).items():
                if name in texts and texts[name] != batch:
                    raise ValueError(f"{type(self).__name__}: conditioning {name!r} means two different texts")
                texts[name] = batch
                keep.append(name)
        combine = None if weights is None else {TARGET_SUM: weights}
        eps = self.predict(x_t, t, combine=combine, keep=list(dict.fromkeys(keep)), **texts) if texts else {}
        tgt = None
        if "tgt" in parts:
            tgt = eps[TARGET_SUM] if weights is not None else self.target_from(eps, x_t, t, prompts, step)
        src = self.source_from(eps, x_t, t, kappa, prompts, step) if "src" in parts else None
        return tgt, src

    def gradient(
        self, x0: torch.Tensor, prompts: Sequence[str], step: int, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """``w(t) * (eps_tgt - eps_src)``; returns ``(grad, t actually used, extras)``."""
        if self.config.full_bridge and self.has_model_source(step):
            return self.full_bridge_gradient(x0, prompts, step, t)
        x_t, t, kappa = self.make_x_t(x0, t, noise, prompts, step)
        eps_tgt, eps_src = self.estimate(x_t, t, kappa, prompts, step)
        grad = self.weight(t, x0, step) * (eps_tgt - eps_src)
        return grad, t, {"eps_tgt": eps_tgt, "eps_src": eps_src, "x_t": x_t, "kappa": kappa}

    def full_bridge_gradient(
        self, x0: torch.Tensor, prompts: Sequence[str], step: int, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """x0 minus PF-ODE generation (eps_tgt) from t of the PF-ODE inversion (eps_src) of x0 to t.

        Both ODEs use the same DDIM timesteps (``bridge_grid``), per sample; timestep 0 is the clean sample itself
        (noise level 1). With the fixed grid the samples' paths differ in length: each step evaluates only the samples
        that move (a sub-batch, when the prompts carry no cameras; otherwise the whole batch, the others kept).
        """
        path = bridge_path(t, self.config.bridge_steps, self.config.bridge_grid, self.prior.num_train_timesteps)
        times = torch.stack(path)  # (L + 1, B)
        levels = self.prior.abar(times.reshape(-1)).reshape(times.shape).to(x0)
        levels = torch.where(times == 0, torch.ones_like(levels), levels)
        moves = times[1:] != times[:-1]  # (L, B): sample b moves between path[i] and path[i + 1]
        # which steps move some / all samples, read once for the whole path (one host sync, as in ``invert``)
        spans = list(zip(moves.any(1).tolist(), moves.all(1).tolist()))
        x = x0
        for i in range(len(path) - 1):  # inversion with the source
            x = self._bridge_step(x, "src", path[i], levels[i], levels[i + 1], moves[i], spans[i], prompts, step)
        x_t = x
        for i in range(len(path) - 1, 0, -1):  # generation with the target
            x = self._bridge_step(x, "tgt", path[i], levels[i], levels[i - 1], moves[i - 1], spans[i - 1], prompts,
                                  step)
        return x0 - x, t, {"x_t": x_t, "x0_bridge": x}

    def _bridge_step(self, x: torch.Tensor, part: str, t: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor,
                     moving: torch.Tensor, span: tuple[bool, bool], prompts: Sequence[str], step: int) -> torch.Tensor:
        """One DDIM step of the samples with ``moving`` set (``span``: whether any / all of them move), eps from
        ``part`` ("src" or "tgt"); the others unchanged."""
        some, every = span
        if not some:
            return x
        which = 0 if part == "tgt" else 1
        rows = None if every else moving.nonzero().flatten()
        sub = None if every else prompt_rows(prompts, rows.tolist())
        if sub is None:  # every sample (those that stay are put back below)
            eps = self.estimate(x, t, None, prompts, step, parts=(part,))[which]
            out = ddim_step(x, eps, per_sample(a_from, x), per_sample(a_to, x))
            return out if every else torch.where(per_sample(moving, x), out, x)
        xs = x[rows]
        eps = self.estimate(xs, t[rows], None, sub, step, parts=(part,))[which]
        out = x.clone()
        out[rows] = ddim_step(xs, eps, per_sample(a_from[rows], xs), per_sample(a_to[rows], xs))
        return out

    def forward(
        self,
        x0: torch.Tensor,
        prompts: Sequence[str],
        step: int,
        *,
        views: Views | None = None,
        t: torch.Tensor | int | None = None,
        noise: torch.Tensor | None = None,
    ) -> GuidanceOutput:
        """Gradient and surrogate loss for the batch ``x0`` (``(B, *sample_shape)``, one prompt per sample).

        ``views``: the step's cameras (3D targets), resolved with the prompts by :attr:`view_prompting`.
        Explicit ``t`` (an int or ``(B,)``) and ``noise`` make the result a pure function of the inputs;
        otherwise they are drawn from the run's generator.
        """
        B = x0.shape[0]
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {B} samples")
        prompts = self.view_prompting.resolve(prompts, views)
        if t is None:
            t = self.sample_timesteps(step, B)
        t = torch.as_tensor(t).long().reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(B).clone()
        if t.numel() != B or bool(((t < 0) | (t >= self.prior.num_train_timesteps)).any()):
            raise ValueError(f"t must hold {B} values in [0, {self.prior.num_train_timesteps}), got {t.tolist()}")
        noise = self.sample_noise(x0) if noise is None else noise.to(x0)
        nfe_before = self.prior.nfe
        with torch.no_grad():
            grad, t, extras = self.gradient(x0.detach().float(), prompts, step, t.to(x0.device), noise.float())
        t = t.cpu()
        if not torch.isfinite(grad).all():
            bad = (~torch.isfinite(grad)).flatten(1).any(1).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"{type(self).__name__} produced a non-finite gradient at step {step} for samples {bad} "
                f"(t={t[bad].tolist()}, prompts={[prompts[i] for i in bad]}); the target was not updated. "
                "Check the prior's dtype (fp16 overflow), the CFG scale (guidance.scale) and the learning rate "
                "(target.optimizer.lr)."
            )
        grad = grad.to(x0.dtype)
        loss = surrogate_loss(x0, grad)
        if self.config.loss_reduction == "mean":  # threestudio SDI: 0.5 mse(x0, x0 - grad, "mean") / B
            factor = 1.0 / (x0.numel() * B)  # applied after the residual, which a tiny grad would lose in fp32
            grad, loss = grad * factor, loss * factor
        kappa = extras.get("kappa")
        return GuidanceOutput(
            grad=grad,
            loss=loss,
            t=t,
            noise=kappa.to(x0.dtype) if isinstance(kappa, torch.Tensor) else noise,
            nfe=self.prior.nfe - nfe_before,
            extras=extras,
        )
