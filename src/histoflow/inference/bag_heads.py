"""A slide- or patient-bag multirun's fold heads (fold_models.load_bag_heads) on new bags: every head on every bag,
as training's held-out predictions were made, and each bag's columns from the fold models' mean with its spread
(voting.prediction_columns) and each fold model's own probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from histoflow.features.bags import Bag
from histoflow.inference.fold_models import BagHeadModel
from histoflow.training.bag_outputs import bag_outputs


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


def fold_columns(per_model: np.ndarray, models: Sequence[BagHeadModel]) -> Mapping[str, float]:
    """Each fold model's probabilities of a bag: prob_<class>_fold<k> (k: its training fold)."""
    return {f"prob_{c}_fold{m.fold}": round(float(p), 6) for m, row in zip(models, per_model)
            for c, p in zip(m.classes, row)}
