"""External validation, the one report of labelled new images and new cohorts: the rows (images, slides or patients)
scored by the fold models together, in the form of the k-fold report (image_report.fold_report: accuracy, balanced
accuracy, macro F1, ROC AUC for two classes, each with its 95% interval over patients, the exact interval where every
resample scores alike, confusion matrix, expected calibration error and reliability diagram), plus the fold models'
agreement: the share of rows where every fold model's own class is the same (models_agree).

Labels: an image's folder names its class (`new/CLL/a.tif`). Where no image's folder is named like a class of the
model, the images carry no labels: predictions only. Where some are, every folder must be: a folder named like no
class is an error naming it. Patients: `groups=<table image,group>` (paths relative to the images folder, as
data.groups); without it each image is its own patient, and the report says so.

Survival and regression heads (task=survival|regression): new bags with targets (a cohort's table, or predict's
`targets=` for new images) scored as the k-fold report scores a fold (inference/target_report.py): C-index,
Kaplan-Meier and log-rank; MAE, R², r; the one fold `external`, its interval over the new patients.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from histoflow.common.errors import ConfigError
from histoflow.data.problems import Problem
from histoflow.data.sources import read_groups
from histoflow.data.targets import TaskConfig, read_targets
from histoflow.inference.image_report import fold_report
from histoflow.inference.target_report import markdown, regression_report, survival_report

log = logging.getLogger(__name__)
EXTERNAL = "external"  # the one "fold" of the rows: every image predicted by every fold model


def folder_labels(paths: Sequence[Path], classes: Sequence[str], labels: str = "auto") -> list[str] | None:
    """Each image's class from its folder's name, or None where the images carry no labels (labels=none, or no
    folder named like a class). A folder named like no class, beside folders that are, is a ConfigError."""
    if labels == "none":
        return None
    if labels not in ("auto", "folder"):
        raise ConfigError(f"labels={labels!r}: expected auto (class folders where an image's folder names a class), "
                          "folder (always) or none")
    found = [p.parent.name for p in paths]
    if labels == "auto" and not set(found) & set(classes):
        return None
    unknown = sorted(set(found) - set(classes))
    if unknown:
        where = {name: next(str(p) for p in paths if p.parent.name == name) for name in unknown}
        raise ConfigError(f"label(s) {unknown} unknown to the model, whose classes are {list(classes)} (class folders: "
                          + "; ".join(f"{k!r} holds {v}" for k, v in where.items())
                          + "). Fix: rename the folder to the model's class, leave those images out, or set "
                          "labels=none (predictions only)")
    return found


def image_groups(paths: Sequence[Path], table: str | None, root: Path | None) -> list[str | None]:
    """Each image's patient from a table image,group (paths relative to `root`, the images folder); None without."""
    if not table:
        return [None] * len(paths)
    if root is None:
        raise ConfigError(f"groups={table}: its paths are relative to the images folder. Fix: pass images=<a folder>")
    groups = read_groups(SimpleNamespace(groups=table), root)
    named = []
    for p in paths:
        rel = p.absolute().relative_to(root.absolute()).as_posix()  # a link is named where it lies
        if rel not in groups:
            raise ConfigError(f"groups={table}: no row for {rel}. Fix: give every image a row image,group")
        named.append(groups[rel][0])
    return named


def fold_agreement(rows: Sequence[Mapping[str, Any]], models: int, unit: str = "image") -> dict[str, Any]:
    """The share of rows whose fold models all give the same class (their models_agree, a bool or as CSV writes it);
    share None where no row has the column."""
    agree = [str(r["models_agree"]) == "True" for r in rows if "models_agree" in r]
    return {"share": sum(agree) / len(agree) if agree else None, "agree": sum(agree), f"{unit}s": len(agree),
            "models": models}


def external_validation(rows: list[dict[str, Any]], classes: list[str], out: Path, settings: Mapping[str, Any],
                        problems: Sequence[Problem] = (), table: str = "predictions.csv") -> dict[str, Any]:
    """report.json, report.md and the figures of labelled new rows (label, group, fold=external) in `out`: the
    k-fold report's form, the fold models' agreement and the calibration; returns the report. The rows' unit is
    settings' bag_level (slide, patient) or image; `table` names where their spread (prob_sd_<class>) is."""
    unit = str(settings.get("bag_level") or "image")
    report = fold_report(rows, classes, out, {**settings, "external": True}, problems, colour=False)
    report["fold_agreement"] = agreement = fold_agreement(rows, int(settings.get("models") or 1), unit)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    said = (f"Fold models' agreement: all {agreement['models']} give the same class to {agreement['agree']} of "
            f"{agreement[f'{unit}s']} {unit}s ({agreement['share']:.3f}); the spread of their probabilities per "
            f"{unit}: prob_sd_<class> in {table}. " if agreement["share"] is not None else "")
    with (out / "report.md").open("a") as md:
        md.write(f"\n## External validation\n\nEvery new {unit} predicted by all {agreement['models']} fold models "
                 "together (their probabilities averaged); the figures above are one external \"fold\". "
                 f"{said}Calibration: ECE {report['calibration']['ece']:.3f} (reliability_images.png).\n")
    return report


def external_report(rows: list[dict[str, Any]], paths: Sequence[Path], labels: Sequence[str],
                    groups: Sequence[str | None],
                    classes: list[str], out: Path, settings: Mapping[str, Any],
                    problems: Sequence[Problem] = ()) -> dict[str, Any]:
    """The external validation of labelled new images (their rows from predictions.csv, with labels and groups
    added in place); returns the report."""
    by_image = dict(zip((str(p) for p in paths), zip(labels, groups)))
    for r in rows:
        label, group = by_image[str(r["image"])]
        r.update(label=label, group=group if group is not None else "", fold=EXTERNAL,
                 correct=r["predicted"] == label)
    return external_validation(rows, classes, out, settings, problems)


def external_task_report(rows: list[dict[str, Any]], task: str, out: Path, settings: Mapping[str, Any],
                         resamples: int = 2000) -> dict[str, Any]:
    """report.json, report.md and the figures of new bags with targets, scored as the k-fold report scores a fold:
    rows (one per patient, slide or image) with name, patient, fold (`external`), risk or predicted (the fold
    models' mean), time and event or target. Returns the report."""
    body = (survival_report if task == "survival" else regression_report)(rows, out, resamples)
    unit = str(settings.get("unit") or settings.get("bag_level") or "image")
    report = {"task": task, "external": True, "unit": unit, "n": len(rows),
              "patients": len({r["patient"] for r in rows}), "bag_level": settings.get("bag_level"), **body,
              "settings": dict(settings)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report).replace(f"# k-fold {task} report", f"# external {task} report")
                                   + f"\nEvery {unit} of the new data scored by all {settings.get('models', '?')} fold "
                                   "models together (their mean; the sd beside it in the predictions): the figures are "
                                   "one external \"fold\", its interval over the new patients.\n")
    return report


def new_image_targets(rows: Sequence[Mapping[str, Any]], table: str, task: TaskConfig, root: Path | None,
                      groups: Sequence[str | None]) -> list[dict[str, Any]]:
    """predict's rows of new images joined to their targets (predict's `targets=`: a CSV image,<the checkpoint's
    task columns>, paths relative to the images folder), in external_task_report's form; an image without a row is
    a ConfigError naming it."""
    targets = read_targets(table, TaskConfig(**{**vars(task), "key": "image"}))
    value = "risk" if task.name == "survival" else "value"
    out = []
    for r, group in zip(rows, groups):
        path = Path(r["image"])
        rel = path.absolute().relative_to(root.absolute()).as_posix() if root else str(path)
        target = targets.get(rel, targets.get(str(path)))
        if target is None:
            raise ConfigError(f"targets={table}: no row for image {rel}. Fix: give every new image a row (image, "
                              f"{', '.join(task.columns)}), or leave targets=null (predictions only)")
        row = {"name": str(path), "patient": group or str(path), "fold": "external", "bags": 1,
               ("risk" if task.name == "survival" else "predicted"): float(r[value])}
        row.update(dict(zip(("time", "event") if task.name == "survival" else ("target",), map(float, target))))
        out.append(row)
    return out
