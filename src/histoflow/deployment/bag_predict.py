"""Bag heads (model=abmil|mean_pool|max_pool, image bags) on new images: each image a bag of the windows training cut
from its images (data.patches of the checkpoint: window side, stride, rotations, tissue share, after the prepared
data's stain step), embedded once by the frozen encoder for every fold model that shares it, then each fold model's
bag probabilities, their mean and their spread.

The rows have the patch vote's form (image, predicted, patches, confidence, vote_margin, votes_<class>,
prob_<class>) plus prob_sd_<class> (the fold models' sd around their mean, ddof=0) and models_agree (every fold
model's own class the same); votes_<class> count the tiles by the fold models' mean verdict on each tile alone.
A survival or regression head (task=survival|regression in its checkpoint) gives one number a fold model instead:
`risk` or `value` (the fold models' mean), `risk_sd` or `value_sd` (their sd, ddof=0) and `risk_fold<k>` or
`value_fold<k>` (each fold model's, as its k-fold run recorded it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from histoflow.common.machine import resolve_device
from histoflow.common.progress import progress_bar
from histoflow.data.images import UnreadableImage, read_rgb
from histoflow.data.patches import PatchConfig, extract_patches
from histoflow.data.pipeline import as_made
from histoflow.data.problems import Problem
from histoflow.data.transforms import PatchTransform
from histoflow.inference.fold_models import FoldModel, encoder_groups
from histoflow.inference.voting import spread_columns, value_columns
from histoflow.training.checkpoints import CheckpointError
from histoflow.training.losses import task_value

log = logging.getLogger(__name__)


def training_windows(models: Sequence[FoldModel]) -> PatchConfig:
    """The windows every fold model's bags were made of (data.patches of its checkpoint); models that differ, or
    a head on patient bags, are refused naming the checkpoint."""
    first = models[0]
    windows = PatchConfig.from_config(first.config["data"].get("patches"))
    for m in models:
        level = (m.config.get("bag") or {}).get("level", "image")
        if level != "image":
            raise CheckpointError(f"{m.path}: a head on {level} bags (bag.level={level}): it predicts a {level}'s "
                                  "images pooled, not one image. Fix: predict images with a head trained on image "
                                  "bags (bag.level=image)")
        if PatchConfig.from_config(m.config["data"].get("patches")) != windows:
            raise CheckpointError(f"{m.path} was trained on windows {m.config['data'].get('patches')}, {first.path} on "
                                  f"{first.config['data'].get('patches')}: one bag is cut one way. Fix: predict with "
                                  "fold models of one training run")
    return windows


@dataclass
class ImageBag:
    """One image's windows as each encoder group's transform prepares them (a tensor per group), or its problem."""

    index: int
    x: list[torch.Tensor] = field(default_factory=list)
    problem: Problem | None = None


class ImageBags(Dataset):
    """New images cut as training cut its images: read, stain step, every window of the grid and its rotations."""

    def __init__(self, paths: Sequence[str | Path], windows: PatchConfig, transforms: Sequence[PatchTransform]) -> None:
        self.paths, self.windows, self.transforms = list(paths), windows, list(transforms)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageBag:
        path = str(self.paths[index])
        try:
            image, _ = read_rgb(path)
        except UnreadableImage as e:
            return ImageBag(index, problem=Problem(path, "corrupt", str(e)))
        cut: dict[int, np.ndarray] = {}  # by stain step: the folds of one run share it
        x = []
        for t in self.transforms:
            key = id(t.stain)
            if key not in cut:
                cut[key] = extract_patches(t.stain(image) if t.stain else image, self.windows)[0]
            if not len(cut[key]):
                h, w = image.shape[:2]
                return ImageBag(index, problem=Problem(path, "too-small", f"{path}: {w}x{h} px holds no "
                                                       f"{self.windows.size}-px window (with enough tissue)"))
            x.append(t(cut[key]))
        return ImageBag(index, x)


@dataclass
class BagPredictions:
    """Per image: each fold model's bag probabilities, the tiles' votes, the tile count; the images that failed."""

    paths: list[str]
    probs: np.ndarray  # (images, models, classes), or (images, models, 1) of a task's risk or value; NaN: failed
    votes: np.ndarray  # (images, classes) int64
    tiles: np.ndarray  # (images,) int64; 0 for a failed image
    problems: dict[int, Problem]
    seconds: float
    encoder_passes: int  # windows through an encoder (all groups)

    @property
    def ok(self) -> np.ndarray:
        return np.flatnonzero(self.tiles > 0)


@torch.inference_mode()
def predict_bags(paths: Sequence[str | Path], models: Sequence[FoldModel], batch_size: int = 512,
                 num_workers: int = 0, device: str = "auto", progress: bool = True, share: bool = True,
                 description: str = "image bags") -> BagPredictions:
    """Every image as a bag through every fold model: the encoder once per window for all the models sharing it."""
    windows = training_windows(models)
    dev = resolve_device(device)
    groups = encoder_groups(models, share)
    for g in groups:
        g.encoder.to(dev).eval()
        for head in g.heads:
            head.to(dev).eval()
    n, c = len(paths), len(models[0].classes)
    learned = models[0].task
    valued = learned.name != "classification"  # a survival risk or a regression value: one number a fold model
    probs = np.full((n, len(models), 1 if valued else c), np.nan)
    votes, tiles = np.zeros((n, c), dtype=np.int64), np.zeros(n, dtype=np.int64)
    problems: dict[int, Problem] = {}
    passes, t0 = 0, time.perf_counter()
    loader = DataLoader(ImageBags(paths, windows, [g.transform for g in groups]), batch_size=None,
                        num_workers=num_workers, collate_fn=as_made)
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=n, rate="")
        for done, item in enumerate(loader, 1):
            if item.problem is not None:
                problems[item.index] = item.problem
            else:
                per_model, tile_probs = [], []
                for g, x in zip(groups, item.x):
                    features = torch.cat([g.encoder(x[i:i + batch_size].to(dev)).float()
                                          for i in range(0, len(x), batch_size)])
                    passes += len(x)
                    for head in g.heads:
                        if valued:
                            per_model.append(task_value(head(features[None]).float(), learned).cpu())
                            continue
                        per_model.append(head(features[None]).float().softmax(-1)[0].cpu())
                        tile_probs.append(head.tile_logits(features).float().softmax(-1).cpu())
                probs[item.index] = torch.stack(per_model).double().numpy()
                if tile_probs:
                    verdicts = torch.stack(tile_probs).mean(0).argmax(1).numpy()
                    votes[item.index] = np.bincount(verdicts, minlength=c)
                tiles[item.index] = len(item.x[0])
            bar.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):.1f} images/s")
    return BagPredictions([str(p) for p in paths], probs, votes, tiles, problems, time.perf_counter() - t0, passes)


def bag_rows(pred: BagPredictions, classes: Sequence[str]) -> list[dict[str, Any]]:
    """predictions.csv's rows (the patch vote's columns, the spread after them) of the images predicted."""
    rows = []
    for i in pred.ok:
        mean = pred.probs[i].mean(0)
        k = int(mean.argmax())
        top2 = np.sort(pred.votes[i])[::-1][:2]
        margin = (top2[0] - (top2[1] if len(top2) > 1 else 0)) / max(1, int(pred.tiles[i]))
        row: dict[str, Any] = {"image": pred.paths[i], "predicted": classes[k], "patches": int(pred.tiles[i]),
                               "confidence": round(float(mean[k]), 6), "vote_margin": round(float(margin), 6)}
        row.update({f"votes_{c}": int(v) for c, v in zip(classes, pred.votes[i])})
        row.update({f"prob_{c}": round(float(p), 6) for c, p in zip(classes, mean)})
        row.update(spread_columns(pred.probs[i], classes))
        rows.append(row)
    return rows


def value_rows(pred: BagPredictions, models: Sequence[FoldModel]) -> list[dict[str, Any]]:
    """predictions.csv's rows of a survival or regression head: image, risk or value (the fold models' mean), its sd
    (ddof=0), patches, and each fold model's (risk_fold<k>). A Cox risk is known up to a constant per fold model:
    compare the folds' own columns, or ranks, where the models' scales differ."""
    rows = []
    for i in pred.ok:
        mean, sd, *folds = value_columns(pred.probs[i], models).items()
        rows.append({"image": pred.paths[i], **dict([mean, sd]), "patches": int(pred.tiles[i]), **dict(folds)})
    return rows
