"""The k-fold report of a multirun of bag heads (model=abmil|mean_pool|max_pool): each fold's held-out bag
predictions (<job>/bag_predictions.csv, training/bag_outputs.py) pooled into the image report's files and summary
(inference/image_report.fold_report): per fold, mean ± sd, pooled with 95% intervals over patients, case-level
accuracy, the colour-only baseline where the bags are images; attention maps over each held-out image or slide and
a gallery of the most and least attended tiles per class (inference/attention_maps.py). The bag's own prediction
replaces the patch vote; `votes_<class>` count the head's verdicts on each tile taken alone (the report's patch
accuracy).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from histoflow.common.errors import MissingInputError
from histoflow.data.problems import Problem
from histoflow.inference.attention_maps import GALLERY, attention_gallery, iter_maps, write_attention_maps
from histoflow.inference.image_report import fold_report, write_csv
from histoflow.training.bag_outputs import PREDICTIONS, read_bag_predictions

MAPS_LOGGED = 16  # attention maps sent to the dashboard (by name); every map is in <report>/attention_maps/


def bag_runs(sweep: str | Path) -> list[Path]:
    """The job folders of a multirun that hold bag predictions, in job order."""
    runs = [p.parent for p in Path(sweep).glob(f"*/{PREDICTIONS}")]
    return sorted(runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def write_bag_report(sweep: str | Path, out: Path | None = None) -> dict[str, Any]:
    """<sweep>/image_report/: report.json, report.md, predictions.csv, confusion and reliability figures, the
    attention gallery and attention maps over every held-out image or slide (attention_maps/). Its keys and W&B
    run: inference/report_run.publish_report, with logged_maps(out)."""
    sweep = Path(sweep).resolve()
    runs = bag_runs(sweep)
    if not runs:
        raise MissingInputError(f"{sweep}: no job holds {PREDICTIONS}; it is not a multirun of bag heads")
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    records = []
    for run in runs:
        fold_rows, record = read_bag_predictions(run)
        rows += fold_rows
        records.append(record)
        problems += [Problem(**{k: v for k, v in p.items() if k in ("path", "kind", "detail")})
                     for p in _problems(run / "problems.csv")]
    folds = [r["fold"] for r in records]
    if len(set(folds)) < len(folds):
        raise MissingInputError(f"{sweep}: folds {folds} repeat: a k-fold report needs one run per fold")
    first = records[0]
    out = out or sweep / "image_report"
    out.mkdir(parents=True, exist_ok=True)
    settings = {"ckpt_path": str(sweep), "aggregate": first.get("aggregate"), "views": first.get("views", 1),
                "window": first.get("window"), "stride": first.get("stride"), "bag_level": first.get("level")}
    write_csv(rows, out / "predictions.csv")
    report = fold_report(rows, first["classes"], out, settings, problems=list({p: None for p in problems}),
                         colour=first.get("level") == "image")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    attention_gallery(runs, first["classes"], out / GALLERY)
    write_attention_maps(runs, out)
    return report


def logged_maps(out: Path) -> dict[str, Path]:
    """The attention maps a report's W&B run shows (MAPS_LOGGED of them, by name)."""
    return {f"report/attention_map/{name}": png for name, png in iter_maps(out, MAPS_LOGGED)}


def _problems(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
