"""Colorectal tiles (Kather 2016 sample, 24 tiles, 8 classes): the tile-folder source and the transfer experiment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import compose_train
from omegaconf import OmegaConf

from histoflow.data.prepare import prepare_dataset
from histoflow.deployment.slide_map import SlideConfig, predict_slide
from histoflow.evaluation.tables import read_confusion_csv
from histoflow.inference.fold_models import load_fold_model
from histoflow.training.run import train

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


def squeezenet_weights() -> Path:
    path = Path(os.environ.get("HISTOFLOW_WEIGHTS", REPO.parent / "shared" / "weights")) / \
        "squeezenet1_1-imagenet-features.pth"
    if not path.is_file():
        pytest.skip(f"real pretrained weights {path} are absent (see ../shared/weights/README.md)")
    return path


def test_frozen_imagenet_features_head_and_a_tumour_map(kather_dir: Path, wsi_dir: Path, tmp_path: Path) -> None:
    """experiment=kather_frozen_squeezenet on real tiles with the real ImageNet weights (64-px tiles for speed):
    the tiles are embedded once, a linear head trains on them, and the head maps a real slide through its encoder."""
    overrides = ["experiment=kather_frozen_squeezenet", *kather_overrides(kather_dir, tmp_path), *SMALL_TILES,
                 f"encoder.weights={squeezenet_weights()}", "trainer.max_epochs=30", "data.loader.batch_size=8"]
    run = tmp_path / "run"
    metrics = train(compose_train(overrides, run))
    (embedded,) = (tmp_path / "data" / "prepared").glob("*/embeddings/squeezenet1_1-*/embeddings.json")
    assert json.loads(embedded.read_text())["dim"] == 512
    # 8 classes, 3 tiles each: the test third holds one tile of each; ImageNet features name several
    assert metrics["test/acc_micro"] > 1 / len(CLASSES)
    model = load_fold_model(metrics["best_checkpoint"])
    assert [n for n, _ in model.net.named_children()] == ["encoder", "head"] and model.patch_size == 64
    cfg = SlideConfig(tile_size=128, mpp=None, batch_size=16, num_workers=0, progress=False)
    result = predict_slide(wsi_dir / "cmu-1-small-region.svs", [(model.net, model.transform)], model.classes, cfg,
                           tmp_path / "slides")
    prob_map = np.load(result.map)
    tissue = ~np.isnan(prob_map[..., 0])
    assert prob_map.shape[-1] == 8 and tissue.any()
    np.testing.assert_allclose(np.nansum(prob_map, axis=-1)[tissue], 1.0, atol=1e-5)
    assert json.loads(result.meta.read_text())["heatmap_class"] == "01_TUMOR"
