"""Uncertainty over patients: bootstrap intervals that resample groups (cases), and case-level accuracy.

Images of one patient are not independent: a net that gets one of a case's images wrong usually gets its
neighbours wrong too. With 25 lymphoma cases the effective sample is 25, not 282 images, so an interval from
resampling images is far too narrow. Here every resample draws groups with replacement and takes all their
images. Accuracy and macro F1 follow from a confusion matrix, so each group is summed to one matrix once and a
resample is a weighted sum of group matrices: the cost grows with resamples x groups x classes², not with images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def _group_index(groups: Sequence[str]) -> np.ndarray:
    """Each row's group as 0..G-1."""
    return np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1].reshape(-1)


def _group_confusions(truth: np.ndarray, preds: np.ndarray, index: np.ndarray, n_classes: int) -> np.ndarray:
    """(G, C, C) confusion counts of each group (rows: true class)."""
    cells = n_classes * n_classes
    counts = np.bincount(index * cells + truth * n_classes + preds, minlength=(index.max() + 1) * cells)
    return counts.reshape(-1, n_classes, n_classes)


def resampled_sums(per_group: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, K) sums of (G, K) per-group values over G groups drawn with replacement (numpy default_rng),
    in chunks of resamples that keep the (chunk, G) draw counts to a few million entries."""
    n_groups = len(per_group)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n_groups)
    sums = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        draws = rng.integers(0, n_groups, (size, n_groups)) + np.arange(size)[:, None] * n_groups
        counts = np.bincount(draws.ravel(), minlength=size * n_groups).reshape(size, n_groups)
        sums.append(counts @ per_group)
    return np.concatenate(sums)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central level-interval of bootstrap values."""
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def accuracy(cm: np.ndarray) -> np.ndarray:
    """Share right of (..., C, C) confusion matrices."""
    return np.trace(cm, axis1=-2, axis2=-1) / np.maximum(cm.sum((-2, -1)), 1)


def macro_f1(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over the classes present in truth or predictions of (..., C, C) confusion matrices (as torchmetrics'
    and scikit-learn's macro F1 of the images)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    fp, fn = cm.sum(-2) - tp, cm.sum(-1) - tp
    present = (tp + fp + fn) > 0
    f1 = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"image/acc": accuracy, "image/f1_macro": macro_f1}


def group_bootstrap(truth: Sequence[int], preds: Sequence[int], groups: Sequence[str], n_classes: int,
                    resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, list[float]]:
    """Percentile intervals of pooled image accuracy and macro F1 (class indices), resampling whole groups with
    replacement: {"image/acc": [low, high], "image/f1_macro": [low, high]}."""
    per_group = _group_confusions(np.asarray(truth), np.asarray(preds), _group_index(groups), n_classes)
    cms = resampled_sums(per_group.reshape(len(per_group), -1), resamples, seed).reshape(-1, n_classes, n_classes)
    return {name: percentile_interval(metric(cms), level) for name, metric in METRICS.items()}


def case_calls(labels: Sequence[int], preds: Sequence[int], probs: np.ndarray, groups: Sequence[str],
               n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group's (true, predicted) class, in sorted group order: predicted is the majority of its images'
    predictions, a tie going to the tied class with the highest mean probability over the group's images; true is
    its images' majority label (a group of one patient has one label; a tie goes to the first class)."""
    index = _group_index(groups)
    n_groups = int(index.max()) + 1

    def per_group(values: np.ndarray) -> np.ndarray:  # (G, C) sums over each group's images
        return np.stack([np.bincount(index, values[:, c], minlength=n_groups) for c in range(n_classes)], 1)

    one_hot = np.eye(n_classes)
    votes, prob_sum = per_group(one_hot[np.asarray(preds)]), per_group(np.asarray(probs, dtype=float))
    tied = votes == votes.max(1, keepdims=True)
    called = np.where(tied, prob_sum, -np.inf).argmax(1)  # sums rank like means within one group
    return per_group(one_hot[np.asarray(labels)]).argmax(1), called


def case_level(labels: Sequence[int], preds: Sequence[int], probs: np.ndarray, groups: Sequence[str],
               n_classes: int, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, object]:
    """Case-level accuracy (see case_calls) with a percentile interval from a bootstrap over cases:
    {"acc", "right", "groups", "interval": [low, high]}."""
    truth, called = case_calls(labels, preds, probs, groups, n_classes)
    correct = (truth == called).astype(float)
    resampled = resampled_sums(correct[:, None], resamples, seed)[:, 0] / len(correct)
    return {"acc": float(correct.mean()), "right": int(correct.sum()), "groups": len(correct),
            "interval": percentile_interval(resampled, level)}
