"""Regression statistics of predicted values, one row per patient: MAE, R² and Pearson's r, each with a bootstrap
interval over patients, and a scatter of predicted against true.

A resample is a weighting of the rows by how often each patient is drawn (evaluation/intervals.py's draws), so all
resamples are computed at once as weighted statistics; with weights of one they are scikit-learn's
mean_absolute_error and r2_score and scipy's pearsonr (the tests hold them to those).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from histoflow.evaluation.intervals import LEVEL, RESAMPLES, percentile_interval, resampled_counts

METRICS = ("mae", "r2", "pearson_r")


def weighted_scores(true: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """(R,) MAE, R² and Pearson r under R weightings (R, N) of the rows; NaN where a weighting leaves no spread."""
    w = weights.astype(float)
    total = w.sum(1)
    mae = (w @ np.abs(pred - true)) / total
    mean_true, mean_pred = (w @ true) / total, (w @ pred) / total
    dt, dp = true[None, :] - mean_true[:, None], pred[None, :] - mean_pred[:, None]
    spread_true, spread_pred = (w * dt**2).sum(1), (w * dp**2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - (w @ (true - pred) ** 2) / spread_true
        r = (w * dt * dp).sum(1) / np.sqrt(spread_true * spread_pred)
    return {"mae": mae, "r2": r2, "pearson_r": r}


def regression_scores(true: Sequence[float], pred: Sequence[float]) -> dict[str, float]:
    """MAE, R² and Pearson r of the rows."""
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    return {k: float(v[0]) for k, v in weighted_scores(true, pred, np.ones((1, len(true)))).items()}


def regression_intervals(true: Sequence[float], pred: Sequence[float], groups: Sequence[str] | None = None,
                         resamples: int = RESAMPLES, seed: int = 0,
                         level: float = LEVEL) -> dict[str, list[float] | None]:
    """Percentile intervals of MAE, R² and Pearson r, resampling patients with replacement (`groups`: each row's
    patient; None: each row its own)."""
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    index = (np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1].reshape(-1) if groups is not None
             else np.arange(len(true)))
    parts = [weighted_scores(true, pred, counts[:, index])
             for counts in resampled_counts(int(index.max()) + 1, resamples, seed)]
    out: dict[str, list[float] | None] = {}
    for name in METRICS:
        values = np.concatenate([p[name] for p in parts])
        values = values[np.isfinite(values)]
        out[name] = percentile_interval(values, level) if len(values) else None
    return out


def scatter_figure(true: Sequence[float], pred: Sequence[float], png: Path, title: str) -> Path:
    """Predicted against true values, with the identity line, in a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(true, pred, s=18, alpha=0.7)
    low, high = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([low, high], [low, high], color="grey", lw=1, ls="--", label="predicted = true")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
