"""Survival statistics of predicted risks, one row per patient: Harrell's C-index with a bootstrap interval over
patients, Kaplan-Meier curves of the predicted low- and high-risk halves with the log-rank p (lifelines).

lifelines (Davidson-Pilon, MIT) is the library: pure Python on numpy, scipy and pandas, with the C-index, the
Kaplan-Meier fitter, the log-rank test and a Cox model (Efron ties) whose partial likelihood the tests hold the
training loss to. The interval resamples patients with replacement (evaluation/intervals.py's draws) and takes
lifelines' C-index of each resample; resamples without a comparable pair are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index

from histoflow.evaluation.intervals import LEVEL, RESAMPLES, percentile_interval, resampled_counts


def harrell_c(time: Sequence[float], event: Sequence[float], risk: Sequence[float]) -> float | None:
    """Harrell's C-index of risks (higher: the event sooner) against (time, event); None without a comparable
    pair (no event, or every event last)."""
    try:
        return float(concordance_index(np.asarray(time, float), -np.asarray(risk, float), np.asarray(event, float)))
    except ZeroDivisionError:  # lifelines' word for "no admissible pairs"
        return None


def cindex_interval(time: Sequence[float], event: Sequence[float], risk: Sequence[float],
                    groups: Sequence[str] | None = None, resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL) -> list[float] | None:
    """Percentile interval of Harrell's C-index, resampling patients with replacement (`groups`: each row's
    patient; None: each row its own); None where no resample has a comparable pair."""
    time, event, risk = (np.asarray(v, dtype=float) for v in (time, event, risk))
    rows = np.arange(len(time))
    index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1].reshape(-1) if groups is not None else rows
    values = []
    for counts in resampled_counts(int(index.max()) + 1, resamples, seed):
        for drawn in counts:
            picked = np.repeat(rows, drawn[index])
            c = harrell_c(time[picked], event[picked], risk[picked])
            if c is not None:
                values.append(c)
    return percentile_interval(np.asarray(values), level) if values else None


def risk_halves(risk: Sequence[float], folds: Sequence[str]) -> np.ndarray:
    """True for the high-risk half: above the median risk of the row's own fold (each fold's model has its own
    scale of risk, so the halves are cut fold by fold and pooled)."""
    risk, folds = np.asarray(risk, dtype=float), np.asarray(folds, dtype=str)
    high = np.zeros(len(risk), dtype=bool)
    for fold in np.unique(folds):
        own = folds == fold
        high[own] = risk[own] > np.median(risk[own])
    return high


def logrank_p(time: Sequence[float], event: Sequence[float], high: Sequence[bool]) -> float | None:
    """The log-rank test's p of the high- against the low-risk group; None where a group is empty."""
    time, event, high = np.asarray(time, float), np.asarray(event, float), np.asarray(high, bool)
    if high.all() or not high.any():
        return None
    return float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)


def kaplan_meier_figure(time: Sequence[float], event: Sequence[float], high: Sequence[bool], png: Path,
                        title: str) -> float | None:
    """Kaplan-Meier curves (with 95% bands) of the predicted low- and high-risk groups in a PNG; the log-rank p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    time, event, high = np.asarray(time, float), np.asarray(event, float), np.asarray(high, bool)
    p = logrank_p(time, event, high)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, members, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if members.any():
            KaplanMeierFitter(label=f"{name} (n={int(members.sum())})").fit(time[members], event[members]) \
                .plot_survival_function(ax=ax, color=colour, show_censors=True)
    ax.set_xlabel("time")
    ax.set_ylabel("share without the event")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title}\nlog-rank p = {p:.3g}" if p is not None else title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return p
