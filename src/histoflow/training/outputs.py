"""What a training run leaves in its folder, and how a multirun's job folders are ordered."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

METRICS_FILE = "test_metrics.json"  # the run's test metrics and best checkpoint: what the k-fold reports read
CONFUSION_FILE = "confusion_test.csv"  # written by PatchClassifier at the end of testing
SUMMARY_FILE = "summary.json"  # a multirun's fold summary (training/fold_summary.py), with its report's keys
REPORT_DIR = "image_report"  # a multirun's k-fold report (inference/sweep_report.py): report.json, report.md, ...


def job_order(path: Path) -> tuple[int, str]:
    """Sort key of a file in a multirun's job folder (<sweep>/<job number>/...): by job number, others last."""
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def merge_csv_metrics(csv_root: Path, out_csv: Path) -> Path | None:
    """Concatenate the CSV logger's version_*/metrics.csv (one per start or resume) into one file.

    A resumed part starts again at its checkpoint's step: rows of earlier parts from that step on (logged after
    the checkpoint, before the interruption, and done again) are dropped, so every step appears once.
    """
    parts = sorted(csv_root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    rows: list[dict[str, str]] = []
    columns: dict[str, None] = {}
    for part in parts:
        with part.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns.update(dict.fromkeys(reader.fieldnames or []))
            new = list(reader)
        steps = [int(r["step"]) for r in new if r.get("step")]
        if steps:
            rows = [r for r in rows if not r.get("step") or int(r["step"]) < min(steps)]
        rows += new
    if not rows:
        return None
    with out_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return out_csv
