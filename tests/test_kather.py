"""Colorectal tiles (Kather 2016 sample, 24 tiles, 8 classes): the tile-folder source and the transfer experiment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from conftest import compose_train
from histoflow.data.prepare import prepare_dataset
from histoflow.reports import read_confusion_csv
from histoflow.training import train

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY"]


pytestmark = pytest.mark.usefixtures("leave_no_trace")


def kather_overrides(kather_dir: Path, work: Path) -> list[str]:
    """The sample, read here, written under `work`, with no worker processes."""
    return [f"data.root={kather_dir}", f"paths.data_dir={work / 'data'}", f"paths.cache_dir={work / 'cache'}",
            "data.loader.num_workers=0", "data.shards.workers=1", "logger=csv"]


SMALL_TILES = ["data.patches.resize=64", "data.loader.crop=64"]  # the nets take any size; 224 px costs CPU time only


def test_tile_folder_source(kather_dir: Path, tmp_path: Path) -> None:
    cfg = compose_train(["data=kather", *kather_overrides(kather_dir, tmp_path)], tmp_path / "run")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    prepared = prepare_dataset(data, quiet=True)
    # 150-px tiles resized to 224, one sample each (no grid cutting, no rotations), split by fractions
    assert prepared.classes == CLASSES and prepared.patch_side == 224 and prepared.test_folds == ["test"]
    rows = prepared.manifest()
    assert len(rows) == 24 and sorted({r["label"] for r in rows}) == CLASSES
    assert {r["fold"] for r in rows} == {"train", "val", "test"}
    split = prepared.split("test")
    counts = {role: sum(r["fold"] == role for r in rows) for role in ("train", "val", "test")}
    assert split.samples == counts and counts["train"] >= 8 and counts["test"] >= 8
    stats = prepared.stats("test")
    assert stats["mean_image"].shape == (224, 224, 3) and np.all(stats["channel_std"] > 0)


def test_transfer_fast_dev_run_offline(kather_dir: Path, tmp_path: Path) -> None:
    """AlexNet (the experiment's default net) from random weights: the run works without network."""
    overrides = ["experiment=kather_transfer", *kather_overrides(kather_dir, tmp_path), "model.weights=null",
                 "trainer.fast_dev_run=true", "data.loader.batch_size=8"]
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.9 and cfg.optimizer.lr == 1e-3
    assert cfg.data.loader.normalize == "imagenet" and cfg.fold == "test"
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc_macro"] <= 1.0 and np.isfinite(metrics["test/loss"])
    cm, classes = read_confusion_csv(tmp_path / "run" / "confusion_test.csv")
    assert classes == CLASSES and cm.sum() > 0
    assert (tmp_path / "run" / "confusion_test.png").is_file()


def test_transfer_from_local_weights_file_frozen_backbone(kather_dir: Path, tmp_path: Path) -> None:
    """ResNet-18 from a local ImageNet-shaped state dict (1000-class head), backbone frozen, two tiny epochs:
    the backbone holds the file's weights, unchanged by training, under a new 8-class head; the per-epoch
    curves and the test confusion matrix are drawn."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)  # stands in for the ImageNet file, shape for shape
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), weights)
    overrides = ["experiment=kather_transfer", "model=resnet18", f"model.weights={weights}",
                 "model.freeze_backbone=true", *kather_overrides(kather_dir, tmp_path), *SMALL_TILES,
                 "trainer.max_epochs=2", "data.loader.batch_size=8", "trainer.limit_train_batches=1",
                 "trainer.limit_val_batches=1",
                 "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1"]
    run = tmp_path / "run"
    metrics = train(compose_train(overrides, run))
    state = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["model.conv1.weight"], source.conv1.weight)  # frozen: the file's weights, unchanged
    assert torch.equal(state["model.layer4.1.conv2.weight"], source.layer4[1].conv2.weight)
    assert state["model.fc.weight"].shape == (8, 512)
    for name in ("training_curves.png", "metrics.csv", "confusion_test.png", "confusion_val.png"):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_epoch", "val/loss", "val/acc_macro"} <= set(header)
    cm, classes = read_confusion_csv(run / "confusion_test.csv")
    assert classes == CLASSES and cm.sum() > 0
