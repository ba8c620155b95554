"""Lightning's CSV logger, with the one write that could lose rows made atomic."""

from __future__ import annotations

import csv
import os

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only


def widen_atomically(writer: ExperimentWriter) -> None:
    """Give the writer's metrics.csv the columns of its pending rows, old rows kept under the new header: written
    whole under a temporary name, then renamed over the old file (the old file or the new, never half of one)."""
    keys = sorted({*writer.metrics_keys, *(k for row in writer.metrics for k in row)})  # sorted, as Lightning keeps them
    path = writer.metrics_file_path
    if keys != writer.metrics_keys and os.path.isfile(path):
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        partial = f"{path}.partial"
        with open(partial, "w", newline="") as file:
            writer_ = csv.DictWriter(file, fieldnames=keys)
            writer_.writeheader()
            writer_.writerows(rows)
        os.replace(partial, path)
    writer.metrics_keys[:] = keys


class CSVLogger(_LightningCSVLogger):
    """pytorch_lightning.loggers.CSVLogger (its folder on a local disk) whose new columns cannot lose rows.

    Lightning appends rows while the columns stay the same, but a new column (e.g. the first epoch-end training
    metrics, logged after the epoch's checkpoint) makes it rewrite the whole file in place: a run killed during that
    rewrite is left with an empty file, and its resumed run with no curves before the kill. Here save() widens the
    file atomically first, so Lightning's own save finds no new column and only appends. Public API only: save(),
    the experiment and its metrics, metrics_keys and metrics_file_path.
    """

    @rank_zero_only
    def save(self) -> None:
        if self.experiment.metrics:
            widen_atomically(self.experiment)
        super().save()
