"""Uncertainty over patients: bootstrap intervals that resample groups (cases), and case-level accuracy.

Images of one patient are not independent: a net that gets one of a case's images wrong usually gets its
neighbours wrong too. With 25 lymphoma cases the effective sample is 25, not 282 images, so an interval from
resampling images is far too narrow. Here every resample draws groups with replacement and takes all their
images. Accuracy and macro F1 follow from a confusion matrix, so each group is summed to one matrix once and a
resample is a weighted sum of group matrices: the cost grows with resamples x groups x classes², not with images.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

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


def resampled_counts(n_groups: int, resamples: int = RESAMPLES, seed: int = 0,
                     chunk_entries: int = 4_000_000) -> Iterator[np.ndarray]:
    """Chunks of (chunk, G) counts: how often each of G groups is drawn in each resample of G groups drawn with
    replacement (numpy default_rng); chunks of resamples that keep each to about chunk_entries entries."""
    rng = np.random.default_rng(seed)
    chunk = max(1, chunk_entries // n_groups)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        draws = rng.integers(0, n_groups, (size, n_groups)) + np.arange(size)[:, None] * n_groups
        yield np.bincount(draws.ravel(), minlength=size * n_groups).reshape(size, n_groups)


def resampled_sums(per_group: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, K) sums of (G, K) per-group values over G groups drawn with replacement."""
    return np.concatenate([counts @ per_group for counts in resampled_counts(len(per_group), resamples, seed)])


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


def balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in truth of (..., C, C) confusion matrices (scikit-learn's balanced
    accuracy)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    support = cm.sum(-1)
    recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
    return recall.sum(-1) / np.maximum((support > 0).sum(-1), 1)


METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"image/acc": accuracy, "image/balanced_acc":
                                                          balanced_accuracy, "image/f1_macro": macro_f1}


def roc_auc(truth: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of scores for class 1 against class 0 (ties count half); None without both."""
    pairs = _pairs(np.asarray(truth), np.asarray(scores, dtype=float))
    return None if pairs is None else float(_weighted_auc(*pairs, np.ones((1, len(truth))))[0])


def _pairs(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The positive and negative rows and the (P, N) outcome of each (positive, negative) pair: 1 ranked right,
    0.5 tied, 0 wrong; None without both classes."""
    positive, negative = truth == 1, truth == 0
    if not positive.any() or not negative.any():
        return None
    sp, sn = scores[positive][:, None], scores[negative][None, :]
    return positive, negative, (sp > sn) + 0.5 * (sp == sn)


def _weighted_auc(positive: np.ndarray, negative: np.ndarray, ranked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R,) ROC AUCs under R weightings (R, N) of the rows (a bootstrap's draw counts): the weighted share of
    (positive, negative) pairs ranked right; NaN where a weighting leaves out a class."""
    wp, wn = weights[:, positive], weights[:, negative]
    pairs = wp.sum(1) * wn.sum(1)
    return np.where(pairs > 0, ((wp @ ranked) * wn).sum(1) / np.maximum(pairs, 1), np.nan)


def group_bootstrap_auc(truth: Sequence[int], scores: Sequence[float], groups: Sequence[str],
                        resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """Percentile interval of the pooled ROC AUC (two classes; scores for class 1), resampling whole groups with
    replacement (resamples drawing one class only are left out); None where the rows hold one class."""
    pairs = _pairs(np.asarray(truth), np.asarray(scores, dtype=float))
    if pairs is None:
        return None
    index = _group_index(groups)
    values = np.concatenate([_weighted_auc(*pairs, counts[:, index])
                             for counts in resampled_counts(int(index.max()) + 1, resamples, seed, 200_000)])
    return percentile_interval(values[~np.isnan(values)], level)


def group_bootstrap(truth: Sequence[int], preds: Sequence[int], groups: Sequence[str], n_classes: int,
                    resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, list[float]]:
    """Percentile intervals of pooled image accuracy, balanced accuracy and macro F1 (class indices), resampling
    whole groups with replacement: {"image/acc": [low, high], "image/balanced_acc": ..., "image/f1_macro": ...}."""
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
    """Case-level accuracy (see case_calls) with a percentile interval from a bootstrap over cases and the exact
    binomial one (each case one trial): {"acc", "right", "groups", "interval": [low, high], "exact": [low, high]}."""
    truth, called = case_calls(labels, preds, probs, groups, n_classes)
    correct = (truth == called).astype(float)
    resampled = resampled_sums(correct[:, None], resamples, seed)[:, 0] / len(correct)
    return {"acc": float(correct.mean()), "right": int(correct.sum()), "groups": len(correct),
            "interval": percentile_interval(resampled, level),
            "exact": clopper_pearson(int(correct.sum()), len(correct), level)}


def clopper_pearson(right: int, n: int, level: float = LEVEL) -> list[float]:
    """The exact binomial interval of right/n (n independent trials: patients, not their images): what a bootstrap
    cannot give where every resample scores alike (all right or all wrong)."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = float(beta.ppf(tail, right, n - right + 1)) if right > 0 else 0.0
    high = float(beta.ppf(1 - tail, right + 1, n - right)) if right < n else 1.0
    return [low, high]
