"""Lightning's loggers, adjusted: the CSV logger's one write that could lose rows made atomic; W&B without a
deprecated argument."""

from __future__ import annotations

import csv
import os
from typing import Any

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only


def widen_atomically(writer: ExperimentWriter) -> None:
    """Give the writer's metrics.csv the columns of its pending rows, old rows kept under the new header: written
    whole under a temporary name, then renamed over the old file (the old file or the new, never half of one)."""
    # sorted, as Lightning keeps them
    keys = sorted({*writer.metrics_keys, *(k for row in writer.metrics for k in row)})
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


class WandbLogger(_LightningWandbLogger):
    """pytorch_lightning.loggers.WandbLogger without the `anonymous=None` it passes to wandb.init, which wandb has
    answered since 0.23 with "The anonymous setting has no effect" on every run (wandb/wandb#10909 names Lightning's
    logger as the reason for the notice). A value the user sets is passed on as given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous", False) is None:  # tests/test_train.py holds this to Lightning's code
            del self._wandb_init["anonymous"]
