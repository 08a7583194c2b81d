"""Time, cost and loss accounting, written to ``summary.json`` and the logger at the end of a run.

Recorded per run: the optimization's wall-clock ``wall_clock_s`` (the training steps only, accumulated across
resumes), ``export_s`` (from the end of the last step to the summary: final images, turntable, mesh, metrics and the
last checkpoint) and, written by the CLI, ``setup_s`` (model loading and text encoding); wall-clock per image and ms
per iteration from the training time alone; NFEs per iteration; peak memory: CUDA max allocated on a GPU (reset when
training starts), else the process's peak resident set size (RSS, which includes the loaded models).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from sdbridge.files import write_text


def peak_memory(device: torch.device | None) -> tuple[float, str]:
    """``(megabytes, kind)``: CUDA max allocated on a CUDA device, else this process's peak RSS."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "rss"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """``run_dir/summary.json``, written atomically (:mod:`sdbridge.files`): a reader sees the previous summary or the
    new one, never a part."""
    return write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2, default=str))


class SummaryCallback(L.Callback):
    """Measures the training wall-clock (the steps, accumulated across resumes) and the export after them, and
    builds the run's summary (``finish``); the CLI writes it (``write_summary``)."""

    def __init__(self, run_dir: Path, info: dict[str, Any], device: torch.device | None = None):
        self.run_dir = Path(run_dir)
        self.info = dict(info)
        self.device = device
        self.elapsed_before = 0.0
        self.steps_before = 0
        self._t0 = 0.0
        self._last_step_end = 0.0
        self.summary: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed_before + (time.perf_counter() - self._t0 if self._t0 else 0.0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed_before = float(state_dict.get("elapsed", 0.0))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.device is not None and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        self._last_step_end = self._t0
        self.steps_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_step_end = time.perf_counter()

    def finish(self, trainer: L.Trainer, pl_module: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """The run's summary (also logged); the time after the last step counts as export, not training."""
        now = time.perf_counter()
        session = self._last_step_end - self._t0 if self._t0 else 0.0
        export = now - self._last_step_end if self._t0 else 0.0
        steps = trainer.global_step
        session_steps = steps - self.steps_before
        wall = self.elapsed_before + session
        num_images = len(pl_module.prompts)
        memory_mb, memory_kind = peak_memory(self.device)
        summary = {
            **self.info,
            "steps": steps,
            "max_steps": trainer.max_steps,
            "wall_clock_s": round(wall, 3),
            "time_per_image_s": round(wall / num_images, 3),
            "ms_per_step": round(1000 * session / session_steps, 3) if session_steps and self._t0 else None,
            "export_s": round(export, 3),
            "nfe_total": pl_module.total_nfe,
            "nfe_per_step": round(pl_module.total_nfe / steps, 3) if steps else None,
            "peak_memory_mb": round(memory_mb, 1),
            "peak_memory_kind": memory_kind,
            "final_loss": pl_module.last_loss,
            "num_images": num_images,
            **extra,
        }
        self.summary = summary
        if trainer.logger:
            trainer.logger.log_metrics(summary_metrics(summary), step=steps)
        return summary


def cost_totals(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals and rates over several summaries (a run's batches, a method's shards): wall-clock, steps, NFEs and
    images summed; time per image, ms and NFEs per step from the sums; the largest peak memory."""
    wall = sum(p["wall_clock_s"] for p in parts)
    steps = sum(p.get("steps_total", p["steps"] * p.get("batches", 1)) for p in parts)
    nfe = sum(p["nfe_total"] for p in parts)
    images = sum(p["num_images"] for p in parts)
    return {
        "wall_clock_s": wall,
        "steps_total": steps,
        "nfe_total": nfe,
        "num_images": images,
        "time_per_image_s": wall / images,
        "ms_per_step": 1000 * wall / steps if steps else None,
        "nfe_per_step": nfe / steps if steps else None,
        "peak_memory_mb": max(p["peak_memory_mb"] for p in parts),
    }


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numeric cost fields of a summary as ``summary/<name>`` logger metrics."""
    keys = ("wall_clock_s", "time_per_image_s", "ms_per_step", "nfe_per_step", "peak_memory_mb", "final_loss",
            "num_images")
    return {f"summary/{k}": float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}
