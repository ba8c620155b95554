"""Tables of results: confusion-matrix CSVs read back, per-fold metrics summarised (mean ± sd), and both as
Markdown."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np

CSV_CORNER = "true\\predicted"  # the first cell of a confusion-matrix CSV (figures.save_confusion_matrix writes them)


def read_confusion_csv(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read a CSV written by save_confusion_matrix back into (cm, classes)."""
    with Path(path).open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows or rows[0][0] != CSV_CORNER:
        raise ValueError(f"{path}: not a confusion-matrix CSV (expected first cell {CSV_CORNER!r})")
    classes = rows[0][1:]
    body = rows[1:]
    if [row[0] for row in body] != classes:
        raise ValueError(f"{path}: row classes {[row[0] for row in body]} differ from columns {classes}")
    cells = [cell for row in body for cell in row[1:]]
    try:
        values: list[int] | list[float] = [int(cell) for cell in cells]
        dtype: type = np.int64
    except ValueError:
        values = [float(cell) for cell in cells]
        dtype = np.float64
    return np.array(values, dtype=dtype).reshape(len(classes), len(classes)), classes


def summarize_folds(per_fold: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric over folds: mean, sd (ddof=1, 0 for one fold), min, max, n."""
    metrics: list[str] = []
    for scores in per_fold.values():
        metrics += [m for m in scores if m not in metrics]
    summary: dict[str, dict[str, float]] = {}
    for metric in metrics:
        # A fold that did not report a metric is left out of that metric's statistics only.
        values = np.array([s[metric] for s in per_fold.values() if metric in s], dtype=float)
        summary[metric] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
            "n": float(len(values)),
        }
    return summary


def matrix_markdown(cm: np.ndarray, classes: list[str]) -> list[str]:
    """A confusion matrix as Markdown table lines (rows: true, columns: predicted)."""
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    return lines + [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(classes, cm.tolist())]


def folds_markdown(
    per_fold: dict[str, dict[str, float]],
    summary: dict[str, dict[str, float]],
    metrics: list[str] | None = None,
    names: Mapping[str, str] | None = None,
) -> str:
    """Markdown table: one row per fold, then a "mean ± sd" row; 3 decimals; columns headed by names (default: the
    metrics' keys)."""
    metrics = list(summary) if metrics is None else metrics
    lines = [
        "| fold | " + " | ".join((names or {}).get(m, m) for m in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for fold, scores in per_fold.items():
        cells = [f"{scores[m]:.3f}" if m in scores else "–" for m in metrics]
        lines.append(f"| {fold} | " + " | ".join(cells) + " |")
    cells = [f"{summary[m]['mean']:.3f} ± {summary[m]['sd']:.3f}" if m in summary else "–" for m in metrics]
    lines.append("| mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
