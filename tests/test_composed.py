"""What is otherwise only composed: trainer=gpu's bf16 autocast and channels_last callback run on the CPU, and the
real lymphoma images trained by case folds and reported image by image (predict.py ckpt_path=<multirun>)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import CLASSES, compose_train, make_images, plotted_lines
from torch import nn

from histoflow.training.callbacks import ChannelsLast
from histoflow.training.run import train

pytestmark = pytest.mark.usefixtures("leave_no_trace")

PROBES: list["Probe"] = []  # every Probe that train() instantiated from the config, latest last


class Probe(pl.Callback):
    """Records, from inside the fit, what the trainer ran: its precision, its callbacks, the layout of the
    convolution weights once training starts, and the dtype and layout of the first convolution's output
    and the loss of every training batch."""

    def __init__(self) -> None:
        self.precision = ""
        self.callbacks: list[pl.Callback] = []
        self.weights_channels_last: list[bool] = []
        self.outputs: list[tuple[torch.dtype, bool]] = []
        self.losses: list[float] = []
        self._hook: Any = None
        PROBES.append(self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.precision = str(trainer.precision)
        self.callbacks = list(trainer.callbacks)
        convs = [m for m in pl_module.modules() if isinstance(m, nn.Conv2d)]
        self.weights_channels_last = [c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs]
        self._hook = convs[0].register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            self.outputs.append((output.dtype, output.is_contiguous(memory_format=torch.channels_last)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hook.remove()


def tiny_overrides(base: Path) -> list[str]:
    """make_images' folders under base/images as the data, outputs under base, three training batches."""
    return [f"data.root={base / 'images'}", f"paths.data_dir={base / 'work'}", f"paths.log_dir={base / 'logs'}",
            f"paths.cache_dir={base / 'cache'}", "data.shards.workers=1", "data.loader.batch_size=8",
            "data.loader.num_workers=0", "data.loader.shuffle_buffer=32", "trainer.max_epochs=1",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1", "test=false", "logger=csv", "+callbacks.probe._target_=test_composed.Probe"]


# --- trainer=gpu on the CPU ---------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["gpu", "cpu"])
def test_gpu_trainer_runs_bf16_and_channels_last_on_cpu(trainer: str, tmp_path: Path, saved_figures: list) -> None:
    """trainer=gpu with only the device swapped (accelerator=cpu) fits three batches under bf16 autocast with
    channels_last weights, and its checkpoint keeps float32 weights (mixed, not bf16-true); trainer=cpu, the
    control, runs none of that, so the assertions tell the two apart. The run's training curves plot what it
    logged."""
    make_images(tmp_path / "images", per_class=6, size=(100, 68))
    overrides = [*tiny_overrides(tmp_path), f"trainer={trainer}"]
    if trainer == "gpu":
        overrides += ["trainer.accelerator=cpu"]  # everything else of conf/trainer/gpu.yaml as it is
    cfg = compose_train(overrides, tmp_path / "run")
    gpu = trainer == "gpu"
    assert (cfg.trainer.precision == "bf16-mixed") is gpu and ("channels_last" in cfg.callbacks) is gpu
    metrics = train(cfg)

    probe = PROBES[-1]
    assert probe.precision == ("bf16-mixed" if gpu else "32-true")
    assert any(isinstance(c, ChannelsLast) for c in probe.callbacks) is gpu
    assert len(probe.weights_channels_last) == 3 and all(w is gpu for w in probe.weights_channels_last)
    assert len(probe.outputs) == 3 == len(probe.losses)  # one forward per training batch
    assert all(o == ((torch.bfloat16, True) if gpu else (torch.float32, False)) for o in probe.outputs)
    assert all(math.isfinite(loss) and loss > 0 for loss in probe.losses)

    best = Path(metrics["best_checkpoint"])
    assert best.is_file() and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    saved = torch.load(best, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    conv = saved["state_dict"]["model.features.0.weight"]
    assert conv.dtype == torch.float32  # bf16-mixed keeps the master weights in float32
    assert conv.is_contiguous(memory_format=torch.channels_last) is gpu  # the layout is saved as trained

    (curves,) = [lines for lines in map(plotted_lines, saved_figures) if "loss" in lines]  # training_curves.png
    assert (tmp_path / "run" / "training_curves.png").is_file()
    assert curves["loss"]["train loss"] == ([0.0], [pytest.approx(metrics["train/loss_epoch"], rel=1e-5)])
    assert curves["loss"]["train loss"][1][0] == pytest.approx(sum(probe.losses) / 3, rel=1e-3)  # mean of batches
    assert curves["accuracy / F1"]["val acc (macro)"] == ([0.0], [pytest.approx(metrics["val/acc_macro"], rel=1e-5)])


# --- the real lymphoma images: case folds -> k-fold image report ------------------------------------


def lymphoma_subset(lymphoma_dir: Path, root: Path, cases_per_class: int = 2, images_per_case: int = 2) -> list[dict]:
    """The first images of the first cases of every class of the real data, copied into root with a cases.csv
    (image,label,group) of their rows: the rows copied."""
    with (lymphoma_dir / "cases.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    chosen: list[dict] = []
    for label in CLASSES:
        cases = list(dict.fromkeys(r["group"] for r in table if r["label"] == label))[:cases_per_class]
        for case in cases:
            chosen += [r for r in table if r["group"] == case][:images_per_case]
    for row in chosen:
        (root / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        (root / row["image"]).write_bytes((lymphoma_dir / row["image"]).read_bytes())
    with (root / "cases.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "group"])
        writer.writeheader()
        writer.writerows(chosen)
    return chosen


def test_real_lymphoma_case_folds_train_then_image_report(lymphoma_dir: Path, tmp_path: Path) -> None:
    """The tutorial's recipe (experiment=janowczyk_lymphoma, case folds) on 12 real images of 6 cases, 2 folds of
    two training batches each, then the k-fold image report of the sweep (what train.py -m writes at its end and
    predict.py ckpt_path=<multirun> writes): every image once, by the fold model that held its case out."""
    from histoflow.data.manifest import read_manifest
    from histoflow.evaluation.tables import read_confusion_csv
    from histoflow.inference.sweep_report import REPORT_DIR, write_image_report

    root = tmp_path / "lymphoma"
    chosen = lymphoma_subset(lymphoma_dir, root)
    case_of = {r["image"]: r["group"] for r in chosen}
    sweep = tmp_path / "multirun"
    for job, fold in enumerate((1, 2)):
        overrides = ["experiment=janowczyk_lymphoma", f"data.root={root}", "data.split.k=2", f"fold={fold}",
                     f"paths.data_dir={tmp_path / 'work'}", f"paths.log_dir={tmp_path / 'logs'}",
                     f"paths.cache_dir={tmp_path / 'cache'}", "data.shards.workers=1", "data.loader.batch_size=32",
                     "data.loader.num_workers=0", "data.loader.shuffle_buffer=64", "data.loader.epoch_batches=2",
                     "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                     "trainer.log_every_n_steps=1", "test=false", "logger=csv"]
        metrics = train(compose_train(overrides, sweep / str(job), multirun=True))
        assert metrics["fold"] == str(fold) and math.isfinite(metrics["train/loss_epoch"])

    (manifest_path,) = (tmp_path / "work" / "prepared").glob("*/manifest.csv")
    fold_of = {r["image"]: r["fold"] for r in read_manifest(manifest_path)}
    assert sorted(fold_of) == sorted(case_of)  # every copied image, and only those, was prepared
    for case in set(case_of.values()):  # case folds: a case is held out by one fold only
        assert len({fold_of[i] for i, c in case_of.items() if c == case}) == 1
    assert set(fold_of.values()) == {"1", "2"}

    report_md = write_image_report(sweep, ["progress=false", "num_workers=0"])
    out = sweep / REPORT_DIR
    assert report_md == out / "report.md" and report_md.is_file()
    report = json.loads((out / "report.json").read_text())
    cm, classes = read_confusion_csv(out / "confusion_images.csv")
    assert classes == CLASSES and report["images"] == 12 == cm.sum()
    assert cm.sum(axis=1).tolist() == [4, 4, 4]  # the true labels: 4 images of each class
    assert set(report["per_fold"]) == {"fold 1", "fold 2"}
    assert report["groups"]["n"] == 6  # the report pools over the 6 cases, not 12 images
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    predicted = [Path(r["image"]).resolve().relative_to(root.resolve()).as_posix() for r in rows]
    assert sorted(predicted) == sorted(case_of)
    windows = ((417 - 36) // 32 + 1) * ((312 - 36) // 32 + 1)  # the 36-px, stride-32 grid of a 417 x 312 image
    for row, image in zip(rows, predicted):
        trained = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
        assert row["fold"] == fold_of[image] == str(trained["fold"])  # the model that never saw the image's case
        assert Path(row["checkpoint"]).is_relative_to(sweep / str(int(row["fold"]) - 1))
        assert row["label"] == image.split("/")[0] and row["predicted"] in CLASSES
        assert int(row["patches"]) == windows == sum(int(row[f"votes_{c}"]) for c in CLASSES)
