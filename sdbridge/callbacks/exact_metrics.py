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


#: how the printed table shows each metric: (column header, format); others print with 4 significant digits
METRIC_COLUMNS = {
    "fd": ("FD", "{:.0f}"),
    "nll_bpd": ("NLL bpd", "{:.2f}"),
    "collapse": ("collapse", "{:.2f}"),
    "sharpness": ("sharpness", "{:.2f}"),
    "saturation": ("saturation", "{:.2f}"),
    "adherence": ("adherence", "{:.2f}"),
    "recognizable": ("recognizable", "{:.2f}"),
}
METRIC_LEGEND = ("FD (Frechet distance), NLL (bits/dim) and collapse: lower is better; sharpness and saturation: 1 = as\n"
                 "the true distribution; adherence and recognizable: share of images, higher is better")


def format_metrics(metrics: dict[str, Any], reference: dict[str, Any] | None = None) -> str:
    """A small text table: one row per prompt and the mean, each metric at a precision a person can read, then (when
    given) the ``reference`` metrics' mean, those of as many exact samples of the same prompts (what the truth
    itself scores at this count: FD is biased upward by few images), and a legend that says which way is better."""
    names = list(metrics["mean"])
    columns = [METRIC_COLUMNS.get(n, (n, "{:.4g}")) for n in names]  # (header, format) per metric
    widths = [max(9, len(header)) for header, _ in columns]
    first = max(13, *(len(p) for p in metrics["per_prompt"]))
    lines = [f"{'prompt':<{first}}  " + "  ".join(f"{h:>{w}}" for (h, _), w in zip(columns, widths))]
    rows = [*metrics["per_prompt"].items(), ("mean", metrics["mean"])]
    if reference is not None:
        rows.append(("exact samples", reference["mean"]))
    for prompt, values in rows:
        cells = (fmt.format(values.get(n, float("nan"))) for n, (_, fmt) in zip(names, columns))
        lines.append(f"{prompt or '(empty)':<{first}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    lines.append(METRIC_LEGEND)
    return "\n".join(lines)
