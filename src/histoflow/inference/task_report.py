"""The k-fold report of a multirun of survival or regression bag heads (task=survival|regression): each fold's
held-out rows (training/target_outputs.py) pooled at the level of the target (task.key: a patient's bags' risks or
values averaged into one row per patient) and reported per fold and pooled (inference/target_report.py: C-index,
Kaplan-Meier and log-rank; MAE, R², r; intervals over patients), with attention maps over every held-out image or
slide (attention_maps/) and the attention gallery of the most and least attended tiles per predicted risk half or
quartile of the predicted value (inference/attention_maps.py).

Written to <multirun>/image_report/ (report.json, report.md, predictions.csv, the PNGs) at the sweep's end, as the
classification report is (inference/sweep_report.py), and logged to W&B where the jobs logged there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from histoflow.common.errors import MissingInputError
from histoflow.inference.attention_maps import GALLERY, QUARTILES, RISK_HALVES, attention_gallery, write_attention_maps
from histoflow.inference.bag_report import bag_runs, logged_maps
from histoflow.inference.image_report import write_csv
from histoflow.inference.report_run import publish_report
from histoflow.inference.target_report import label_rows, markdown, regression_report, survival_report
from histoflow.training.bag_outputs import ATTENTION, read_bag_predictions


def is_task_sweep(runs: Sequence[Path]) -> bool:
    """Whether a multirun's bag heads learned a survival or regression target (their bags.json names the task)."""
    return bool(runs) and bool(json.loads((runs[0] / "bags.json").read_text()).get("task"))


def write_task_report(sweep: str | Path, out: Path | None = None,
                      resamples: int = 2000) -> dict[str, Any]:
    """<sweep>/image_report/: report.json, report.md, predictions.csv (one row per target) and the figures of a
    multirun of survival or regression bag heads; logged to W&B where the sweep's jobs logged there."""
    sweep = Path(sweep).resolve()
    runs = bag_runs(sweep)
    if not runs or not is_task_sweep(runs):
        raise MissingInputError(f"{sweep}: no job holds the predictions of a survival or regression bag head")
    rows, records = [], []
    for run in runs:
        fold_rows, record = read_bag_predictions(run)
        rows += fold_rows
        records.append(record)
    folds = [r["fold"] for r in records]
    if len(set(folds)) < len(folds):
        raise MissingInputError(f"{sweep}: folds {folds} repeat: a k-fold report needs one run per fold")
    task = records[0]["task"]
    out = out or sweep / "image_report"
    out.mkdir(parents=True, exist_ok=True)
    targets = label_rows(rows, task)
    body = (survival_report if task["name"] == "survival" else regression_report)(targets, out, resamples)
    report = {"task": task["name"], "loss": task["loss"], "unit": task.get("key", "patient"), "n": len(targets),
              "patients": len({r["patient"] for r in targets}), "bag_level": records[0].get("level"),
              "folds": folds, "stratified_by": records[0].get("stratified_by"), **body,
              "settings": {k: records[0].get(k) for k in ("aggregate", "window", "stride")}}
    write_csv(targets, out / "predictions.csv")
    if all((run / ATTENTION).is_file() for run in runs) and all(r.get("sources") for r in records):
        # where the head looked: maps over every held-out image or slide; the gallery by predicted risk half or
        # by quartile of the predicted value (inference/attention_maps.py)
        survival = task["name"] == "survival"
        attention_gallery(runs, RISK_HALVES if survival else QUARTILES, out / GALLERY, by="predicted",
                          rows_are="predicted risk half" if survival else "quartile of the predicted value")
        write_attention_maps(runs, out)
        report["figures"].append(GALLERY)
    (out / "report.md").write_text(markdown(report))
    # report.json with its keys, and beside the folds in W&B where they logged there (one path for every report)
    publish_report(out, report, [sweep], images={**{f"report/{Path(png).stem}": out / png
                                                    for png in report["figures"]}, **logged_maps(out)})
    return report
