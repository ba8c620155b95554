"""The LightningModule of a bag head with a target beyond classes (task=survival|regression; conf/task/).

Batches are padded bags whose labels are the task's targets (features/bags.pad_bags: (B, 2) time, event or (B, 1)
values). The loss follows task.loss (training/losses.py); each validation and test epoch logs the loss and, over
all its bags, the C-index of the risks (survival: `<stage>/cindex`, lifelines) or the MAE and R² of the values
(regression: `<stage>/mae`, `<stage>/r2`): monitor=val/cindex or val/r2 (max) select on them. The epoch's
scores are this process's bags; the k-fold report (inference/task_report.py) is the analysis at the patient level.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from histoflow.data.targets import TaskConfig
from histoflow.evaluation.regression import regression_scores
from histoflow.evaluation.survival import harrell_c
from histoflow.training.losses import task_loss, task_value, time_cuts
from histoflow.training.module import optimizers_of


class BagTargetModule(pl.LightningModule):
    """A head on bags (models/mil.py) trained for a survival or regression target; `cuts`: the inner time cut
    points of the discrete-time loss (task.loss=nll), from the training bags' event times."""

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer] | None,
                 task: Mapping[str, Any], classes: list[str] | None = None, scheduler: Callable[..., Any] | None = None,
                 input_size: int | None = None, config: Mapping[str, Any] | None = None,
                 feature_dim: int | None = None, cuts: list[float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.model = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.task = TaskConfig(**dict(task))
        self.classes = list(classes or [])
        self.register_buffer("cuts", torch.tensor(cuts or [], dtype=torch.float32), persistent=False)
        self._epoch: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}

    @classmethod
    def for_data(cls, net: nn.Module, task: TaskConfig, datamodule: Any, **kwargs: Any) -> "BagTargetModule":
        """The module of a task on a bag DataModule: the discrete-time cut points from its training bags."""
        cuts = None
        if task.loss == "nll":
            targets = np.stack([b.target for b in datamodule.bags["train"]])
            cuts = time_cuts(targets[:, 0], targets[:, 1], task.bins)
        return cls(net, task=vars(task), cuts=cuts, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head's outputs (B, task outputs) of bags (B, N, D) with mask (B, N)."""
        return self.model(x, mask)

    def predict_value(self, outputs: torch.Tensor) -> torch.Tensor:
        """One number per bag: its risk (survival; higher: the event sooner) or its predicted value (regression)."""
        return task_value(outputs, self.task)

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return task_loss(outputs, targets, self.task.loss, self.cuts)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, mask, targets = batch[:3]
        loss = self._loss(self(x, mask), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> None:
        x, mask, targets = batch[:3]
        outputs = self(x, mask)
        self.log(f"{stage}/loss", self._loss(outputs, targets), on_epoch=True, batch_size=len(x), sync_dist=True)
        self._epoch[stage].append((self.predict_value(outputs).detach().cpu(), targets.detach().cpu()))

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        if not self._epoch[stage]:
            return
        values = torch.cat([v for v, _ in self._epoch[stage]]).double().numpy()
        targets = torch.cat([t for _, t in self._epoch[stage]]).double().numpy()
        self._epoch[stage].clear()
        if self.task.name == "survival":
            c = harrell_c(targets[:, 0], targets[:, 1], values)
            self.log(f"{stage}/cindex", float("nan") if c is None else c)
        else:
            scores = regression_scores(targets[:, 0], values)
            self.log_dict({f"{stage}/mae": scores["mae"], f"{stage}/r2": scores["r2"]})

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> Any:
        return optimizers_of(self, self.optimizer_factory, self.scheduler_factory)
