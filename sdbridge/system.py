"""The one LightningModule for every target: render -> encode -> guidance -> loss -> step.

Optimization is manual (``automatic_optimization = False``) so that guidances with their own trainable parts
(VSD's LoRA) can step their optimizers inside the same training step. The prior is shared and frozen; it is not
registered as a submodule, so checkpoints hold only the target, trainable guidance state, optimizers and the run's
RNG state — never the multi-GB diffusion weights.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch.utils.data import IterableDataset

from sdbridge.guidance.base import Guidance, GuidanceOutput
from sdbridge.priors.base import DiffusionPrior, attach_prior
from sdbridge.targets.base import Target
from sdbridge.views import Views


class StepStream(IterableDataset):
    """An endless stream of empty batches: image targets need no data; the step index comes from the trainer."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield {}


def step_stream_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(StepStream(), batch_size=None, collate_fn=None, num_workers=0)


def distillation_step(
    guidance: Guidance,
    target: Target,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    prompts: list[str],
    step: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    views: Views | None = None,
) -> tuple[GuidanceOutput, dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """One optimization step on the rendered ``x0``: the guidance's gradient, the target's step, and the update of
    the guidance's own trainable parts (VSD's source) on the detached ``x0``, before the target step (the samples the
    gradient was computed on, as the official VSD codes do) or after it, as ``guidance.train_before_target_step`` says.
    ``views``: the step's cameras (3D targets), passed to the guidance with the prompts. Returns ``(guidance output, regularizers, loss, source logs)``."""
    out = guidance(x0, prompts, step, views=views)
    regs = target.regularizers(step)
    loss = out.loss + sum(regs.values(), torch.zeros((), device=out.loss.device))
    source_first = guidance.train_before_target_step
    source_logs = guidance.train_step(x0.detach(), prompts, step, views=views) if source_first else {}
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    optimizer.step()
    if not source_first:  # an image target's x0 is its parameter: the source sees the updated image
        source_logs = guidance.train_step(x0.detach(), prompts, step, views=views)
    return out, regs, loss, source_logs


class DistillationSystem(L.LightningModule):
    """Optimizes ``target`` so its renders follow ``guidance`` for ``prompts`` (one prompt per sample)."""

    def __init__(
        self,
        prior: DiffusionPrior,
        guidance: Guidance,
        target: Target,
        prompts: list[str],
        generator: torch.Generator,
    ):
        super().__init__()
        attach_prior(self, prior)
        self.guidance = guidance
        self.target = target
        self.prompts = list(prompts)
        self.generator = generator
        self.automatic_optimization = False
        self._last_loss: torch.Tensor | float = float("nan")
        self.total_nfe = 0

    @property
    def last_loss(self) -> float:
        """The last step's surrogate loss per sample."""
        return float(self._last_loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.target.configure_optimizer()

    def on_fit_start(self) -> None:
        self.guidance.setup(self.trainer.max_steps, initial_noise=self.target.initial_noise())

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return step_stream_loader()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        opt = self.optimizers()
        render = self.target(batch)
        x0 = render.x0 if render.x0 is not None else self.prior.encode(render.images)
        prompts = render.prompts if render.prompts is not None else self.prompts
        out, regs, loss, source_logs = distillation_step(self.guidance, self.target, opt, x0, prompts, step,
                                                         self.manual_backward, views=render.views)

        n = x0.shape[0]
        self.total_nfe += out.nfe
        self._last_loss = out.loss.detach() / n  # read as a float only when needed: no device sync per step
        if self._logs_this_step():
            metrics = {
                "loss": self.last_loss,
                "grad_norm": out.grad.detach().flatten(1).norm(dim=1).mean(),
                "t": out.t.float().mean(),
                "nfe": float(out.nfe),
            }
            for name, value in regs.items():
                metrics[f"reg/{name}"] = value.detach()
            metrics.update(source_logs)
            self.log_dict(metrics, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
            self.log("nfe_total", float(self.total_nfe), prog_bar=False, on_step=True, on_epoch=False, batch_size=n)
        return loss.detach()

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's metrics (every ``trainer.log_every`` steps). ``self.log`` costs
        ~0.4 ms per key and step in Lightning's result bookkeeping, a third of a tiny-SD step, so the values are only
        logged when they will be written (the progress bar then refreshes its numbers at the same steps)."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sdbridge"] = {
            "generator_state": self.generator.get_state(),
            "total_nfe": self.total_nfe,
            "prior_nfe": self.prior.nfe,
            "prompts": self.prompts,
            "last_loss": self.last_loss,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["sdbridge"]
        if state["prompts"] != self.prompts:
            raise ValueError("the checkpoint was made for other prompts; resume with the run's saved config")
        self.generator.set_state(state["generator_state"])
        self.total_nfe = int(state["total_nfe"])
        self.prior.nfe = int(state["prior_nfe"])
        self._last_loss = float(state.get("last_loss", float("nan")))
