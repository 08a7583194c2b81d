"""Exact metrics of the current images against the exact prior's true distributions (``eval.exact``)."""

from __future__ import annotations

from typing import Any

import lightning as L

from sdbridge.metrics.exact import exact_metrics


class ExactMetricsCallback(L.Callback):
    """Computes :func:`sdbridge.metrics.exact.exact_metrics` on the target's model-space samples (unclamped x0) every ``every`` steps (0: only at
    the end) and logs the means as ``exact/<metric>``; the final result is kept in :attr:`final`."""

    def __init__(self, prior: Any, every: int = 0):
        self.prior = prior
        self.every = every
        self.final: dict[str, Any] | None = None

    def compute(self, pl_module) -> dict[str, Any]:
        target = pl_module.target
        return exact_metrics(self.prior, target.model_samples(), target.sample_prompts(pl_module.prompts))

    def _log(self, trainer, metrics: dict[str, Any]) -> None:
        if trainer.logger:
            trainer.logger.log_metrics({f"exact/{k}": v for k, v in metrics["mean"].items()}, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and trainer.global_step % self.every == 0:
            self._log(trainer, self.compute(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = self.compute(pl_module)
        self._log(trainer, self.final)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small text table: one row per prompt and the mean."""
    names = list(metrics["mean"])
    width = max(12, *(len(p) for p in metrics["per_prompt"]))
    lines = [f"{'prompt':<{width}}  " + "  ".join(f"{n:>9}" for n in names)]
    for prompt, values in metrics["per_prompt"].items():
        lines.append(f"{prompt or '(empty)':<{width}}  " + "  ".join(f"{values.get(n, float('nan')):9.4f}" for n in names))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{metrics['mean'][n]:9.4f}" for n in names))
    return "\n".join(lines)
