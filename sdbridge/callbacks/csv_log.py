"""``logs/metrics.csv`` that survives a resume and is always whole.

Lightning's CSVLogger deletes ``metrics.csv`` when it opens the log directory, so a resumed run used to keep only the
rows of the steps it ran itself; it also appends to the file in place, so a full disk left a half-written row.
:class:`RunCSVLogger` keeps the earlier rows: on its first save it drops the rows of the steps the resumed run logs
again (those after the checkpoint it continues from) and appends the new ones, so a run stopped and resumed has the
same steps in its log as one that ran straight through. Every save rewrites the file atomically
(:mod:`sdbridge.files`): a failed save leaves the previous file.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sdbridge.files import atomic_open


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # called by __init__: read the earlier rows instead of deleting them
        self._rows: list[dict[str, Any]] = []
        self._resumed = os.path.isfile(self.metrics_file_path)
        if self._resumed:
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if not self.metrics:
            return
        if self._resumed:
            first = min(int(m["step"]) for m in self.metrics)
            self._rows = [r for r in self._rows if r.get("step") not in (None, "") and int(float(r["step"])) < first]
            self._resumed = False
        self._record_new_keys()
        rows = self._rows + self.metrics
        with atomic_open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self._rows = rows
        self.metrics = []


class RunCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` keeps the rows before a resume and is written atomically (module docstring)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
