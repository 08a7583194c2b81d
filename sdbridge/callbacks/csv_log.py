"""``logs/metrics.csv`` that survives a resume.

Lightning's CSVLogger deletes ``metrics.csv`` when it opens the log directory, so a resumed run used to keep only the
rows of the steps it ran itself. :class:`RunCSVLogger` keeps the earlier rows: on its first save it drops the rows of
the steps the resumed run logs again (those after the checkpoint it continues from) and appends the new ones, so a
run stopped and resumed has the same steps in its log as one that ran straight through.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # called by __init__: read the earlier rows instead of deleting them
        self._kept: list[dict[str, Any]] | None = None
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self._kept = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._kept is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            rows = [r for r in self._kept if r.get("step") not in (None, "") and int(float(r["step"])) < first]
            tmp = f"{self.metrics_file_path}.tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.metrics_file_path)
            self._kept = None
        super().save()


class RunCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` keeps the rows before a resume (module docstring)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
