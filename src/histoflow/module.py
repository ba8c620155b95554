"""The LightningModule: a patch classifier trained with cross-entropy, scored by accuracy, F1 and confusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import hydra
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from histoflow.config import plain
from histoflow.errors import ConfigError, HistoflowError
from histoflow.models import build_encoder, clean_state_dict, encoder_with_head
from histoflow.reports import save_confusion_matrix

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
        # Frozen parameters (freeze_backbone) are left out, so weight decay does not shrink them either.
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                          "interval": "epoch"}}


def require_head(model_cfg: Mapping[str, Any], encoder: bool) -> None:
    """With a frozen encoder the model must be a head on its features (it lists in_features): checked before any
    embedding, which `encoder=... model=alexnet32` once ran in full before a conv2d traceback."""
    if encoder and "in_features" not in model_cfg:
        raise ConfigError(f"model {model_cfg.get('name') or model_cfg.get('_target_')} takes patches, but encoder= "
                          "gives it features. Fix: put a head on the encoder (model=linear_head or model=mlp_head), or "
                          "drop encoder= to train this net on the patches")


def build_net(model_cfg: Mapping[str, Any], num_classes: int, input_size: int | None,
              in_features: int | None = None) -> nn.Module:
    """The net of a `model` config with num_classes, and where the config lists them, from the data: input_size
    (the input side) and in_features (a head's, the encoder's feature width)."""
    cfg = dict(plain(model_cfg))
    cfg.pop("preprocess", None)  # the data loader's business (models.preprocess), not the constructor's
    extra: dict[str, Any] = {"input_size": input_size} if "input_size" in cfg else {}
    require_head(cfg, in_features is not None)
    if "in_features" in cfg:
        if in_features is None:
            raise ConfigError(f"model {cfg.get('_target_')} is a head on frozen features: it needs an encoder. "
                              "Fix: add encoder=<name> (conf/encoder), e.g. encoder=squeezenet1_1_imagenet")
        extra["in_features"] = in_features
    return hydra.utils.instantiate(cfg, num_classes=num_classes, **extra)


TRUSTED_TARGETS = ("histoflow.models.", "torchvision.models.", "torch.optim.")


class UntrustedCheckpoint(HistoflowError, ValueError):
    """A checkpoint whose stored config would build objects outside the trusted prefixes."""


def untrusted_targets(config: Any, trusted: Iterable[str]) -> list[str]:
    """Every `_target_` in a (nested) config that does not start with a trusted prefix."""
    if isinstance(config, Mapping):
        own = [str(config["_target_"])] if "_target_" in config else []
        bad = [t for t in own if not t.startswith(tuple(trusted))]
        return bad + [t for v in config.values() for t in untrusted_targets(v, trusted)]
    if isinstance(config, (list, tuple)):
        return [t for v in config for t in untrusted_targets(v, trusted)]
    return []


def load_classifier(checkpoint_path: str | Path, trusted: Iterable[str] = TRUSTED_TARGETS,
                    map_location: str | torch.device = "cpu", checkpoint: Mapping[str, Any] | None = None,
                    encoder_weights: str | None = None) -> PatchClassifier:
    """A trained PatchClassifier from a histoflow checkpoint, its net rebuilt from the config stored in it.

    The file is read with weights_only=True (no pickled code runs), unless its contents are given already read
    (`checkpoint`), and the stored model config is instantiated only when its `_target_`s start with a trusted
    prefix. A head's encoder is rebuilt with `encoder_weights` where given, else the weights file it was trained on.
    """
    if checkpoint is None:
        checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    config, classes = hparams["config"], hparams["classes"]
    bad = untrusted_targets([config.get("model"), config.get("encoder")], trusted)
    if bad:
        raise UntrustedCheckpoint(f"{checkpoint_path}: its config would instantiate {bad}, which are not trusted. "
                                  f"Fix: if you trust this checkpoint, add the prefixes to trusted_targets "
                                  f"(now {list(trusted)})")
    model_cfg = dict(config["model"])
    if "weights" in model_cfg:
        model_cfg["weights"] = None  # the checkpoint holds every weight: no pretrained download needed
    net = build_net(model_cfg, len(classes), hparams["input_size"], hparams.get("feature_dim"))
    net.load_state_dict(clean_state_dict(checkpoint))
    if config.get("encoder"):  # a head on frozen features: predicts patches through its encoder, rebuilt as trained
        encoder = {**config["encoder"], **({"weights": encoder_weights} if encoder_weights else {})}
        net = encoder_with_head(build_encoder(encoder, hparams["input_size"])[0], net)
    # no optimizer: a loaded classifier predicts; training resumes through Trainer.fit(ckpt_path=...)
    return PatchClassifier(net, optimizer=None, classes=classes, input_size=hparams["input_size"], config=config,
                           feature_dim=hparams.get("feature_dim"))
