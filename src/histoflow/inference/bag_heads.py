"""A slide- or patient-bag multirun's fold models put to work on new bags: each fold's head read from its checkpoint
(the head alone: the frozen encoder runs once, in the cohort's embedding, features/cohort.py), then every head on
every bag, and the fold models' mean with its spread.

A head is read as prediction reads every checkpoint (training/checkpoints.py: weights_only, trusted targets only).
Its checkpoint keeps the full training config (encoder, data.slide: the tiling, classes) and, from the bag
DataModule, the cohort settings that keyed its features (the encoder's weights' sha256 among them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from histoflow.data.targets import TaskConfig
from histoflow.features.bags import Bag, pad_bags
from histoflow.inference.fold_models import find_checkpoints
from histoflow.models import clean_state_dict, is_bag_head
from histoflow.models.build import build_net
from histoflow.training.bag_outputs import bag_outputs
from histoflow.training.checkpoints import (
    TRUSTED_TARGETS,
    CheckpointError,
    head_outputs,
    read_checkpoint,
    untrusted_targets,
)
from histoflow.training.losses import task_value

SLIDE_BAG_STATE = "SlideBagDataModule"  # Lightning saves the datamodule's state_dict() under its class name


@dataclass
class BagHeadModel:
    """One fold's head on slide or patient bags, with what it was trained on."""

    path: Path
    fold: str
    classes: list[str]
    head: nn.Module
    config: dict[str, Any]  # the full resolved training config
    level: str  # slide | patient
    cohort: dict[str, Any]  # the cohort settings of its features ({} for a checkpoint older than they are kept)

    @property
    def tiling(self) -> dict[str, Any]:
        """data.slide of its training: how its slides were cut into tiles."""
        return dict(self.config["data"].get("slide") or {})

    @property
    def task(self) -> TaskConfig:
        """What its head learned: classes, a survival risk or a regression value (the training config's task)."""
        return TaskConfig.from_config(self.config.get("task"))


def is_slide_bag_checkpoint(path: str | Path) -> bool:
    """Whether ckpt_path's first checkpoint is a head on slide or patient bags (data=slides)."""
    config = read_checkpoint(find_checkpoints(path)[0])["hyper_parameters"]["config"]
    return is_bag_head(config.get("model") or {}) and str(config["data"].get("_target_", "")).endswith(
        "SlideBagDataModule")


def load_bag_head(path: Path, trusted: Iterable[str] = TRUSTED_TARGETS) -> BagHeadModel:
    """A head on slide or patient bags from its checkpoint; CheckpointError naming the file where it is none."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    config, classes = hparams["config"], list(hparams["classes"])
    if not is_bag_head(config.get("model") or {}):
        raise CheckpointError(f"{path}: not a head on bags (model {config['model'].get('_target_')}): slide tables "
                              "with a patch model are predicted as maps (slides=<files>, docs/prediction.md)")
    bad = untrusted_targets([config.get("model")], trusted)
    if bad:
        raise CheckpointError(f"{path}: its config would instantiate {bad}, which are not trusted. Fix: if you trust "
                              f"this checkpoint, add the prefixes to trusted_targets (now {list(trusted)})")
    head = build_net(dict(config["model"]), head_outputs(hparams), hparams["input_size"], hparams.get("feature_dim"))
    head.load_state_dict(clean_state_dict(checkpoint))
    state = checkpoint.get(SLIDE_BAG_STATE) or {}
    level = str((state.get("bag") or config.get("bag") or {}).get("level", "slide"))
    return BagHeadModel(path, str(config["fold"]), classes, head.eval(), config, level, dict(state.get("cohort") or {}))


def load_bag_heads(ckpt_path: str | Path, trusted: Iterable[str] = TRUSTED_TARGETS) -> list[BagHeadModel]:
    """Every fold's head of a multirun (or the one of a run or .ckpt); heads that differ in classes, bag level,
    encoder or tiling cannot be averaged and are refused naming both checkpoints."""
    models = [load_bag_head(p, trusted) for p in find_checkpoints(ckpt_path)]
    first = models[0]
    for m in models[1:]:
        for what, mine, theirs in (("classes", m.classes, first.classes), ("bag.level", m.level, first.level),
                                   ("encoder and tiling (cohort settings)", m.cohort, first.cohort)):
            if mine != theirs:
                raise CheckpointError(f"{m.path} was trained with {what} {mine}, {first.path} with {theirs}: their "
                                      "probabilities cannot be averaged. Fix: predict with the fold models of one "
                                      "training multirun")
    return models


@dataclass
class FoldPredictions:
    """Every fold model on every bag: probabilities, attention and each tile's own probabilities."""

    probs: np.ndarray  # (bags, models, classes)
    attention: list[np.ndarray]  # per bag (tiles,): the fold models' mean attention
    tile_probs: list[np.ndarray]  # per bag (tiles, classes): the fold models' mean of each tile's verdict alone

    def mean(self) -> np.ndarray:
        return self.probs.mean(1)


@torch.inference_mode()
def predict_bags(models: Sequence[BagHeadModel], bags: Sequence[Bag], batch_size: int = 16) -> FoldPredictions:
    """Each fold's head on each bag, as training's held-out predictions were made (training.bag_outputs), so a bag
    gets from a fold model the very probabilities its k-fold report recorded."""
    if models[0].task.name != "classification":
        return predict_values(models, bags, batch_size)
    classes = models[0].classes
    probs = np.zeros((len(bags), len(models), len(classes)))
    attention = [np.zeros(len(b), dtype=np.float64) for b in bags]
    tile_probs = [np.zeros((len(b), len(classes)), dtype=np.float64) for b in bags]
    for j, m in enumerate(models):
        rows, weights = bag_outputs(m.head, bags, classes, batch_size=batch_size)
        for i, (row, w) in enumerate(zip(rows, weights)):
            probs[i, j] = [row[f"prob_{c}"] for c in classes]
            attention[i] += w / len(models)
            tile_probs[i] += m.head.tile_logits(bags[i].features).float().softmax(-1).double().numpy() / len(models)
    return FoldPredictions(probs, [a.astype(np.float32) for a in attention], tile_probs)


@torch.inference_mode()
def predict_values(models: Sequence[BagHeadModel], bags: Sequence[Bag], batch_size: int = 16) -> FoldPredictions:
    """A survival or regression head's risk or value of each bag from each fold model (probs: (bags, models, 1)), as
    training/target_outputs.py recorded its held-out bags; no tile verdicts (tile_probs: (tiles, 0))."""
    task = models[0].task
    values = np.zeros((len(bags), len(models), 1))
    attention = [np.zeros(len(b), dtype=np.float64) for b in bags]
    for j, m in enumerate(models):
        for start in range(0, len(bags), batch_size):
            chunk = [(b, i) for i, b in enumerate(bags[start:start + batch_size])]
            x, mask, _, _ = pad_bags(chunk)
            values[start:start + len(chunk), j, 0] = task_value(m.head(x, mask), task).double().numpy()
            weights = (m.head.attention_weights(x, mask) if hasattr(m.head, "attention_weights")
                       else mask.float() / mask.sum(1, keepdim=True))
            for k, (b, _) in enumerate(chunk):
                attention[start + k] += weights[k, :len(b)].double().numpy() / len(models)
    return FoldPredictions(values, [a.astype(np.float32) for a in attention], [np.zeros((len(b), 0)) for b in bags])


def value_columns(per_model: np.ndarray, models: Sequence[BagHeadModel]) -> dict[str, Any]:
    """One bag's columns from its (models, 1) risks or values: risk|value (the fold models' mean), its sd (ddof=0),
    and each fold model's (risk_fold<k>)."""
    name = "risk" if models[0].task.name == "survival" else "value"
    v = per_model[:, 0]
    return {name: round(float(v.mean()), 6), f"{name}_sd": round(float(v.std()), 6),
            **{f"{name}_fold{m.fold}": round(float(x), 6) for m, x in zip(models, v)}}


def prediction_columns(per_model: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """One bag's columns from its (models, classes) probabilities: predicted (the mean's most probable class),
    confidence, prob_<class> (the fold models' mean), prob_sd_<class> (their sd, ddof=0), models_agree (every fold
    model's own class the same)."""
    mean = per_model.mean(0)
    own = per_model.argmax(1)
    k = int(mean.argmax())
    return {"predicted": classes[k], "confidence": round(float(mean[k]), 6),
            **{f"prob_{c}": round(float(p), 6) for c, p in zip(classes, mean)},
            **{f"prob_sd_{c}": round(float(s), 6) for c, s in zip(classes, per_model.std(0))},
            "models_agree": bool((own == own[0]).all())}


def fold_columns(per_model: np.ndarray, models: Sequence[BagHeadModel]) -> Mapping[str, float]:
    """Each fold model's probabilities of a bag: prob_<class>_fold<k> (k: its training fold)."""
    return {f"prob_{c}_fold{m.fold}": round(float(p), 6) for m, row in zip(models, per_model)
            for c, p in zip(m.classes, row)}
