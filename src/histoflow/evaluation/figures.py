"""Figures of training and prediction: confusion matrices (PNG, with their CSV), reliability diagrams and training
curves (the interval plot of docs/results.md is tools/interval_plot.py)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from histoflow.evaluation.tables import CSV_CORNER

DPI = 120

# Curves drawn by plot_training_curves: (label, candidate columns in order of preference), the names
# PatchClassifier logs. train/loss is logged per step and per epoch (Lightning's epoch aggregate is
# train/loss_epoch, preferred; train/loss_step the per-step values); train/acc once per epoch.
LOSS_CURVES: list[tuple[str, tuple[str, ...]]] = [
    ("train loss", ("train/loss_epoch", "train/loss_step")),
    ("val loss", ("val/loss",)),
]
SCORE_CURVES: list[tuple[str, tuple[str, ...]]] = [
    ("train acc", ("train/acc",)),
    ("val acc (micro)", ("val/acc_micro",)),
    ("val acc (macro)", ("val/acc_macro",)),
    ("val F1 (macro)", ("val/f1_macro",)),
]


def _check_cm(cm: np.ndarray, classes: list[str]) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if cm.shape[0] != len(classes):
        raise ValueError(f"confusion matrix is {cm.shape[0]}x{cm.shape[0]} but {len(classes)} classes were given")
    return cm


def _row_recall(cm: np.ndarray) -> np.ndarray:
    """Row-normalised matrix; rows with no samples are NaN (recall undefined, not zero)."""
    totals = cm.sum(axis=1, keepdims=True).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, cm / np.where(totals > 0, totals, 1), np.nan)


def confusion_figure(cm: np.ndarray, classes: list[str], title: str = "") -> Figure:
    """Confusion-matrix figure: counts in cells, colour by row recall, accuracy in the title."""
    cm = _check_cm(cm, classes)
    n = len(classes)
    norm = _row_recall(cm)
    total = float(cm.sum())
    accuracy = float(np.trace(cm)) / total if total > 0 else float("nan")

    side = max(4.0, 1.0 + 0.6 * n)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    # Colour by recall rather than counts so that small classes are as readable as large ones.
    image = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="recall (row-normalised)")

    for i in range(n):
        for j in range(n):
            value = cm[i, j]
            text = f"{int(value)}" if float(value).is_integer() else f"{value:.2f}"
            shade = norm[i, j] if not math.isnan(norm[i, j]) else 0.0
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if shade > 0.5 else "black")

    recall = np.diag(norm)
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right")
    ax.set_yticks(
        range(n),
        labels=[f"{c} (recall {'n/a' if math.isnan(r) else f'{r:.0%}'})" for c, r in zip(classes, recall)],
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    heading = f"accuracy {accuracy:.3f} (n={int(total)})"
    ax.set_title(f"{title}\n{heading}" if title else heading)
    fig.tight_layout()
    return fig


def save_confusion_matrix(
    cm: np.ndarray, classes: list[str], out_stem: str | Path, title: str = ""
) -> tuple[Path, Path]:
    """Write `<out_stem>.csv` and `<out_stem>.png`; return (csv_path, png_path)."""
    cm = _check_cm(cm, classes)
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out_stem.parent / f"{out_stem.name}.csv"
    png_path = out_stem.parent / f"{out_stem.name}.png"

    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([CSV_CORNER, *classes])
        # Integer counts stay integers; repr() of a Python float round-trips exactly otherwise.
        as_text = (lambda v: str(int(v))) if np.issubdtype(cm.dtype, np.integer) else (lambda v: repr(float(v)))
        for name, row in zip(classes, cm):
            writer.writerow([name, *(as_text(v) for v in row)])

    fig = confusion_figure(cm, classes, title)
    fig.savefig(png_path, dpi=DPI)
    return csv_path, png_path


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Equal-width confidence bins: count, mean confidence and accuracy of the images in each (empty bins left out)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": float((which == b).sum()),
             "confidence": float(confidence[which == b].mean()), "accuracy": float(correct[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def save_reliability_diagram(confidence: np.ndarray, correct: np.ndarray, png: str | Path, title: str = "",
                             bins: int = 10) -> Path:
    """Accuracy against confidence per bin (bars, width = bin), the diagonal of perfect calibration, counts above."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    for b in reliability_bins(np.asarray(confidence, float), np.asarray(correct, float), bins):
        ax.bar(b["low"], b["accuracy"], width=b["high"] - b["low"], align="edge", color="tab:blue", alpha=0.7,
               edgecolor="black")
        ax.text((b["low"] + b["high"]) / 2, min(b["accuracy"] + 0.02, 0.97), str(int(b["count"])), ha="center",
                fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean probability of the predicted class)",
           ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=DPI)
    return Path(png)


def _epoch_series(rows: list[dict[str, str]], column: str) -> tuple[list[int], list[float]]:
    """(epochs, values) for one column, keeping the last value logged in each epoch."""
    last: dict[int, float] = {}
    for row in rows:
        epoch, value = row.get("epoch") or "", row.get(column) or ""
        if epoch.strip() and value.strip():
            last[int(float(epoch))] = float(value)
    epochs = sorted(last)
    return epochs, [last[e] for e in epochs]


def _plot_panel(
    ax: Axes, rows: list[dict[str, str]], columns: list[str], curves: list[tuple[str, tuple[str, ...]]], ylabel: str
) -> None:
    """Draw whichever of `curves` exist in `columns` on one axes, or say there is no data."""
    drawn = 0
    for label, candidates in curves:
        column = next((c for c in candidates if c in columns), None)
        if column is None:
            continue
        epochs, values = _epoch_series(rows, column)
        if epochs:
            # Markers keep a single-epoch run visible (a one-point line draws nothing).
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
            drawn += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Plot per-epoch loss (left) and accuracy/F1 (right) from a Lightning CSVLogger metrics.csv."""
    with Path(metrics_csv).open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    fig = Figure(figsize=(10, 4))
    loss_ax, score_ax = fig.subplots(1, 2)
    _plot_panel(loss_ax, rows, columns, LOSS_CURVES, "loss")
    _plot_panel(score_ax, rows, columns, SCORE_CURVES, "score")
    loss_ax.set_title("loss")
    score_ax.set_title("accuracy / F1")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=DPI)
    return out_png
