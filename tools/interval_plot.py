"""The forest plot of docs/results.md (tools/results.py): values with their 95% intervals, one row per recipe."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from histoflow.evaluation.figures import DPI


def save_interval_plot(labels: list[str], values: list[float], intervals: list[tuple[float, float] | None],
                       png: str | Path, title: str = "", xlabel: str = "",
                       baseline: tuple[str, list[float | None]] | None = None,
                       references: dict[str, float] | None = None) -> Path:
    """A forest plot: one row per label (top first), its value as a dot and its interval as a bar; a baseline's
    value per row as a cross beside it (e.g. colour only on the same folds) and reference values as vertical lines
    (e.g. chance, a floor). Long labels are shortened to fit."""
    rows = np.arange(len(labels))[::-1]  # the first label on top
    fig = Figure(figsize=(9.0, 1.2 + 0.38 * len(labels)))
    ax = fig.add_subplot()
    for y, interval in zip(rows, intervals):
        if interval is not None:
            ax.hlines(y, interval[0], interval[1], color="tab:blue", linewidth=2)
    ax.plot(values, rows, "o", color="tab:blue", label="value [95% interval]")
    if baseline is not None:
        name, marks = baseline
        shown = [(v, y) for v, y in zip(marks, rows) if v is not None]
        ax.plot([v for v, _ in shown], [y for _, y in shown], "x", color="tab:red", label=name)
    for (name, x), style in zip((references or {}).items(), (":", "--", "-.")):
        ax.axvline(x, linestyle=style, color="grey", label=name)
    ax.set_yticks(rows, [textwrap.shorten(label, 70, placeholder=" …") for label in labels], fontsize=8)
    ax.set(xlim=(0, 1), xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / fig.get_figheight() - 0.04), ncol=3, fontsize=7)
    fig.savefig(png, dpi=DPI, bbox_inches="tight")  # the legend below the axes and the long labels included
    return Path(png)
