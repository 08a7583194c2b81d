"""A rich progress bar labelled by step (runs are step-based; Lightning's default label counts epochs)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar

#: seconds between two redraws of the bar: a person reads no faster, and a redraw per step (metrics collected, rich
#: rendered) cost ~0.15 ms of a ~8 ms tiny-SD step (experiments/bench/README.md, profile)
REDRAW_EVERY_S = 0.1


class StepProgressBar(RichProgressBar):
    """Shows ``step k/N`` with the logged loss, grad norm, t and NFEs of the last step; redrawn at most every
    :data:`REDRAW_EVERY_S` seconds, and always at the last step."""

    _last_redraw = float("-inf")

    def _get_train_description(self, current_epoch: int) -> str:
        return "optimizing"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        last = trainer.max_steps is not None and trainer.global_step >= trainer.max_steps
        if now - self._last_redraw < REDRAW_EVERY_S and not last and self.train_progress_bar_id is not None:
            return  # the bar's position is absolute (step k): a skipped redraw loses nothing
        self._last_redraw = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
