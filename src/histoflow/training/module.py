"""The LightningModule: a patch classifier trained with cross-entropy, scored by accuracy, F1 and confusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from histoflow.evaluation.figures import save_confusion_matrix

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # an optimizer config's _partial_: called with the parameters
SchedulerFactory = Callable[..., Any]  # likewise, called with the optimizer


def scores(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy both ways (micro: share of patches right; macro: mean per-class recall) and macro F1."""
    return MetricCollection(
        {
            "acc_micro": MulticlassAccuracy(num_classes, average="micro"),
            "acc_macro": MulticlassAccuracy(num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )



def optimizers_of(module: nn.Module, optimizer: Callable[..., Any], scheduler: Callable[..., Any] | None) -> Any:
    """Lightning's configure_optimizers of a module: the optimizer (a partial from the config) over its trainable
    parameters (frozen ones, e.g. freeze_backbone, left out, so weight decay does not shrink them either) and, where
    given, the scheduler stepped every epoch."""
    built = optimizer(params=[p for p in module.parameters() if p.requires_grad])
    if scheduler is None:
        return built
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler(optimizer=built), "interval": "epoch"}}

class PatchClassifier(pl.LightningModule):
    """Any classifier net of patches; metrics are DDP-safe torchmetrics, reports go to the trainer's root dir."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None,
        classes: list[str],
        scheduler: SchedulerFactory | None = None,
        input_size: int | None = None,
        config: Mapping[str, Any] | None = None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        # The factories are rebuilt from `config` when needed; keeping them out of the checkpoint keeps it
        # loadable with torch.load(weights_only=True), which has no room for pickled callables.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        # Named `model` so that checkpoints load as weights too (torchvision_model strips the "model." prefix).
        self.model = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.classes = list(classes)
        n = len(self.classes)
        self.criterion = nn.CrossEntropyLoss()
        self.train_scores = MulticlassAccuracy(n, average="micro")
        self.val_scores, self.test_scores = scores(n, "val/"), scores(n, "test/")
        self.val_confusion, self.test_confusion = MulticlassConfusionMatrix(n), MulticlassConfusionMatrix(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) of a batch of patches (B, 3, H, W)."""
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_scores.update(logits.detach(), y)  # update, not forward: no per-batch value is logged
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("train/acc", self.train_scores, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self.criterion(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        getattr(self, f"{stage}_scores").update(logits, y)
        getattr(self, f"{stage}_confusion").update(logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        """Log the epoch's scores and write its confusion matrix (CSV, PNG, and an image for W&B)."""
        collection, confusion = getattr(self, f"{stage}_scores"), getattr(self, f"{stage}_confusion")
        # compute() gathers over DDP ranks already, so the values logged are the same on every rank.
        self.log_dict(collection.compute())
        cm = confusion.compute().cpu().numpy()
        collection.reset()
        confusion.reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        title = f"{stage} epoch {self.current_epoch}"
        stem = Path(self.trainer.default_root_dir) / f"confusion_{stage}"
        _, png = save_confusion_matrix(cm, self.classes, stem, title)
        for logger in self.loggers:
            # WandbLogger has log_image; CSV and TensorBoard loggers keep the PNG on disk instead.
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"{stage}/confusion", images=[str(png)], step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> Any:
        return optimizers_of(self, self.optimizer_factory, self.scheduler_factory)


class BagClassifier(PatchClassifier):
    """A head on bags (models/mil.py): batches are padded bags (features, mask, labels, bag indices); one label
    and one prediction per bag, scored as the patch classifier scores patches."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes) of bags (B, N, D) with mask (B, N)."""
        return self.model(x, mask)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, mask, y = batch[:3]
        logits = self(x, mask)
        loss = self.criterion(logits, y)
        self.train_scores.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("train/acc", self.train_scores, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, ...], stage: str) -> None:
        x, mask, y = batch[:3]
        logits = self(x, mask)
        self.log(f"{stage}/loss", self.criterion(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        getattr(self, f"{stage}_scores").update(logits, y)
        getattr(self, f"{stage}_confusion").update(logits, y)
