"""Lightning's CSV logger, with the one write that could lose rows made atomic."""

from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class AtomicHeaderWriter(ExperimentWriter):
    """Rewrites metrics.csv for a new column into a temporary file, then renames it over the old one.

    Lightning appends rows while the columns stay the same, but a new column (e.g. the first epoch-end
    training metrics, logged after the epoch's checkpoint) rewrites the whole file in place: a run killed
    during that rewrite is left with an empty file, and its resumed run with no curves before the kill.
    """

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        partial = f"{self.metrics_file_path}.partial"
        with self._fs.open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(partial, self.metrics_file_path)  # a rename on a local disk: the old file or the new, never half


class CSVLogger(_LightningCSVLogger):
    """pytorch_lightning.loggers.CSVLogger writing through AtomicHeaderWriter."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AtomicHeaderWriter(log_dir=self.log_dir)
        return self._experiment
