"""A slide- or patient-bag multirun's fold heads (fold_models.load_bag_heads) on new bags: every head on every bag,
as training's held-out predictions were made, and each bag's columns from the fold models' mean with its spread
(voting.prediction_columns) and each fold model's own probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from histoflow.features.bags import Bag, pad_bags
from histoflow.inference.fold_models import BagHeadModel
from histoflow.inference.voting import fold_labels
from histoflow.training.bag_outputs import bag_outputs
from histoflow.training.losses import task_value


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


def fold_columns(per_model: np.ndarray, models: Sequence[BagHeadModel]) -> Mapping[str, float]:
    """Each fold model's probabilities of a bag: prob_<class>_fold<k> (k: its training fold)."""
    return {f"prob_{c}_fold{k}": round(float(p), 6) for m, k, row in zip(models, fold_labels(models), per_model)
            for c, p in zip(m.classes, row)}
