"""Uncertainty over patients: bootstrap intervals that resample groups (cases), and case-level accuracy.

Images of one patient are not independent: a net that gets one of a case's images wrong usually gets its
neighbours wrong too. With 25 lymphoma cases the effective sample is 25, not 282 images, so an interval from
resampling images is far too narrow. Here every resample draws groups with replacement and takes all their
images. Accuracy and macro F1 follow from a confusion matrix, so each group is summed to one matrix once and a
resample is a weighted sum of group matrices: the cost grows with resamples x groups, not with images.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def _group_confusions(truth: np.ndarray, preds: np.ndarray, groups: Sequence[str], n_classes: int) -> np.ndarray:
    """(G, C, C) confusion counts of each group (rows: true class)."""
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    counts = np.zeros((index.max() + 1, n_classes * n_classes), dtype=np.int64)
    np.add.at(counts, (index, truth * n_classes + preds), 1)
    return counts.reshape(-1, n_classes, n_classes)


def accuracy(cm: np.ndarray) -> np.ndarray:
    """Share right of (..., C, C) confusion matrices."""
    return np.trace(cm, axis1=-2, axis2=-1) / np.maximum(cm.sum((-2, -1)), 1)


def macro_f1(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over the classes present in truth or predictions of (..., C, C) confusion matrices."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    fp, fn = cm.sum(-2) - tp, cm.sum(-1) - tp
    present = (tp + fp + fn) > 0
    f1 = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def group_bootstrap(truth: Sequence[int], preds: Sequence[int], groups: Sequence[str], n_classes: int,
                    resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, list[float]]:
    """Percentile intervals of pooled image accuracy and macro F1, resampling whole groups with replacement."""
    per_group = _group_confusions(np.asarray(truth), np.asarray(preds), groups, n_classes)
    n_groups = len(per_group)
    draws = np.random.default_rng(seed).integers(0, n_groups, (resamples, n_groups))
    weights = np.zeros((resamples, n_groups), dtype=np.int64)
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1)
    cms = (weights @ per_group.reshape(n_groups, -1)).reshape(resamples, n_classes, n_classes)
    tail = (1 - level) / 2 * 100
    return {name: np.percentile(fn(cms), [tail, 100 - tail]).tolist()
            for name, fn in (("image/acc", accuracy), ("image/f1_macro", macro_f1))}


def case_level(labels: Sequence[str], predicted: Sequence[str], probs: np.ndarray, groups: Sequence[str],
               classes: Sequence[str], resamples: int = RESAMPLES, seed: int = 0,
               level: float = LEVEL) -> dict[str, object]:
    """Each case's class by the majority of its images' predictions (a tie: the tied class with the highest mean
    probability over the case's images) against the case's label (its images' majority), with a bootstrap
    interval over cases."""
    order = list(dict.fromkeys(groups))
    right = []
    for group in order:
        members = [i for i, g in enumerate(groups) if g == group]
        votes = Counter(predicted[i] for i in members)
        top = max(votes.values())
        tied = [c for c in classes if votes.get(c, 0) == top]
        mean = probs[members].mean(0)
        call = max(tied, key=lambda c: mean[list(classes).index(c)])
        truth = Counter(labels[i] for i in members).most_common(1)[0][0]
        right.append(call == truth)
    correct = np.asarray(right, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(correct), (resamples, len(correct)))
    tail = (1 - level) / 2 * 100
    return {"acc": float(correct.mean()), "right": int(correct.sum()), "groups": len(correct),
            "interval": np.percentile(correct[draws].mean(1), [tail, 100 - tail]).tolist()}
