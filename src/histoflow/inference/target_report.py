"""The report of survival or regression heads' rows at the level of the target (one row per patient, slide or image,
task.key), per fold and pooled, with 95% intervals from resampling patients: the k-fold report's body
(inference/task_report.py), and the body of the external validation of new images or slides with targets (one fold,
`external`: deployment/external_report.py).

    survival    Harrell's C-index (lifelines) per fold, mean ± sd, pooled; Kaplan-Meier curves of the predicted
                low- and high-risk halves (cut at each fold's median risk) with the log-rank p, pooled and per fold.
                Each fold's model has its own risk scale (a Cox risk is known up to a constant), so the pooled
                C-index compares the risks as ranks within their fold (0..1), not as raw numbers.
    regression  MAE, R², Pearson r per fold, mean ± sd, pooled; a scatter of predicted against true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from histoflow.evaluation.regression import METRICS, regression_intervals, regression_scores, scatter_figure
from histoflow.evaluation.survival import cindex_interval, harrell_c, kaplan_meier_figure, risk_halves

# the folds of a task's runs (bags.json's stratified_by): by patient, stratified by the event or the target's bin
FOLDS = "The folds are drawn by patient (no patient on both sides), stratified by the {by}."
# runs recorded before image bags drew their own folds took the prepared data's (by patient, stratified by class)
IMAGE_FOLDS = ("The folds of these image bags are the prepared data's (manifest.csv: by patient, stratified by "
               "class), not stratified by the {target}: a fold may hold few {few}.")


def label_rows(rows: Sequence[Mapping[str, Any]], task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per target (patient, or slide/image where task.key says so): the mean of its bags' risks or
    predicted values, its fold, its patient, its bags."""
    by_key: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        key = r["group"] if task.get("key", "patient") == "patient" else r["image"]
        by_key.setdefault((str(r["fold"]), str(key)), []).append(r)
    value = "risk" if task["name"] == "survival" else "predicted"
    out = []
    for (fold, key), members in by_key.items():
        row = {"name": key, "patient": members[0]["group"], "fold": fold, "bags": len(members),
               value: float(np.mean([float(m[value]) for m in members]))}
        columns = ("time", "event") if task["name"] == "survival" else ("target",)
        row.update({c: float(members[0][c]) for c in columns})
        out.append(row)
    return out


def _summary(values: Sequence[float | None]) -> dict[str, float]:
    known = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    return {"mean": float(known.mean()) if len(known) else float("nan"),
            "sd": float(known.std(ddof=1)) if len(known) > 1 else 0.0, "n": len(known)}


def survival_report(rows: list[dict[str, Any]], out: Path, resamples: int) -> dict[str, Any]:
    """Per-fold and pooled C-index with intervals over patients, the Kaplan-Meier figures, the log-rank p."""
    folds = sorted({r["fold"] for r in rows}, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    per_fold = {}
    for fold in folds:
        own = [r for r in rows if r["fold"] == fold]
        t, e, risk = ([r[k] for r in own] for k in ("time", "event", "risk"))
        high = risk_halves(risk, [fold] * len(own))
        per_fold[f"fold {fold}"] = {
            "n": len(own), "events": int(sum(e)), "cindex": harrell_c(t, e, risk),
            "interval": cindex_interval(t, e, risk, [r["patient"] for r in own], resamples),
            "logrank_p": kaplan_meier_figure(t, e, high, out / f"kaplan_meier_fold{fold}.png",
                                             f"fold {fold}: predicted risk halves")}
    for fold in folds:  # within-fold ranks: the pooled C-index compares folds' risks on one scale
        own = [r for r in rows if r["fold"] == fold]
        for r, rank in zip(own, rankdata([r["risk"] for r in own]) / len(own)):
            r["risk_rank"] = float(rank)
    t, e = [r["time"] for r in rows], [r["event"] for r in rows]
    ranks, patients = [r["risk_rank"] for r in rows], [r["patient"] for r in rows]
    high = risk_halves([r["risk"] for r in rows], [r["fold"] for r in rows])
    for r, h in zip(rows, high):
        r["risk_group"] = "high" if h else "low"
    pooled = {"cindex": harrell_c(t, e, ranks), "interval": cindex_interval(t, e, ranks, patients, resamples),
              "logrank_p": kaplan_meier_figure(t, e, high, out / "kaplan_meier.png",
                                               f"pooled over {len(folds)} folds: predicted risk halves"),
              "risk": "ranks within each fold"}
    return {"per_fold": per_fold, "summary": {"cindex": _summary([f["cindex"] for f in per_fold.values()])},
            "pooled": pooled, "events": int(sum(e)), "figures": ["kaplan_meier.png"]
            + [f"kaplan_meier_fold{f}.png" for f in folds]}


def regression_report(rows: list[dict[str, Any]], out: Path, resamples: int) -> dict[str, Any]:
    """Per-fold and pooled MAE, R², Pearson r with intervals over patients, the scatter figure."""
    folds = sorted({r["fold"] for r in rows}, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    per_fold = {}
    for fold in folds:
        own = [r for r in rows if r["fold"] == fold]
        y, p, g = [r["target"] for r in own], [r["predicted"] for r in own], [r["patient"] for r in own]
        per_fold[f"fold {fold}"] = {"n": len(own), **regression_scores(y, p),
                                    "interval": regression_intervals(y, p, g, resamples)}
    y, p, g = [r["target"] for r in rows], [r["predicted"] for r in rows], [r["patient"] for r in rows]
    scatter_figure(y, p, out / "scatter.png", f"pooled over {len(folds)} folds: predicted against true")
    return {"per_fold": per_fold, "summary": {m: _summary([f[m] for f in per_fold.values()]) for m in METRICS},
            "pooled": {**regression_scores(y, p), "interval": regression_intervals(y, p, g, resamples)},
            "figures": ["scatter.png"]}


def _fmt(value: float | None, interval: Sequence[float] | None = None) -> str:
    text = "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"
    return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def task_headline(report: Mapping[str, Any]) -> str:
    """The figures that matter, in one line."""
    pooled, unit = report["pooled"], report["unit"]
    if report["task"] == "survival":
        s = report["summary"]["cindex"]
        return (f"C-index {_fmt(pooled['cindex'], pooled['interval'])} (95% CI over {report['patients']} patients) "
                f"pooled over {report['n']} {unit}s ({report['events']} events), {s['mean']:.3f} ± {s['sd']:.3f} "
                f"over {s['n']} folds; log-rank p {_p(pooled['logrank_p'])}")
    return (f"MAE {_fmt(pooled['mae'], pooled['interval']['mae'])}, R² {_fmt(pooled['r2'], pooled['interval']['r2'])}"
            f", Pearson r {_fmt(pooled['pearson_r'], pooled['interval']['pearson_r'])} pooled over {report['n']} "
            f"{unit}s (95% CI over {report['patients']} patients)")


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: the headline, a row per fold, the figures."""
    survival = report["task"] == "survival"
    lines = [f"# k-fold {report['task']} report", "", task_headline(report), ""]
    if survival:
        lines += ["| fold | n | events | C-index [95% CI] | log-rank p |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {f['n']} | {f['events']} | {_fmt(f['cindex'], f['interval'])} | {_p(f['logrank_p'])} |"
                  for k, f in report["per_fold"].items()]
        p = report["pooled"]
        pooled_row = (f"| pooled | {report['n']} | {report['events']} | {_fmt(p['cindex'], p['interval'])} | "
                      f"{_p(p['logrank_p'])} |")
        lines += [pooled_row, "", "The pooled C-index ranks each fold's risks within the fold (each model has its "
                  "own scale); the risk halves are cut at each fold's median.", ""]
    else:
        lines += ["| fold | n | MAE | R² | Pearson r |", "|---|---|---|---|---|"]
        for k, f in [*report["per_fold"].items(), ("pooled", {"n": report["n"], **report["pooled"]})]:
            lines.append(f"| {k} | {f['n']} | " + " | ".join(_fmt(f[m], f["interval"][m]) for m in METRICS) + " |")
        lines.append("")
    if report.get("stratified_by") and not report.get("external"):
        lines += [FOLDS.format(by=report["stratified_by"]), ""]
    elif report.get("bag_level") == "image" and not report.get("external"):
        lines += [IMAGE_FOLDS.format(target="event" if survival else "target", few="events" if survival else
                                     "high or low targets"), ""]
    lines += [f"![{png}]({png})" for png in report["figures"]]
    return "\n".join(lines) + "\n"
