"""Image-level results: prediction tables, the k-fold report (per fold, mean ± sd, pooled confusion); its keys and
W&B run: inference/report_run.py."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_calibration_error,
)

from histoflow.data.problems import Problem
from histoflow.evaluation.colour_baseline import (
    CLASSIFIERS,
    colour_features,
    cross_validated_predictions,
)
from histoflow.evaluation.colour_baseline import NAMES as COLOUR_NAMES
from histoflow.evaluation.figures import (
    reliability_bins,
    save_confusion_matrix,
    save_reliability_diagram,
)
from histoflow.evaluation.intervals import (
    LEVEL,
    METRICS,
    RESAMPLES,
    case_level,
    group_bootstrap,
    group_bootstrap_auc,
    roc_auc,
)
from histoflow.evaluation.tables import folds_markdown, matrix_markdown, summarize_folds
from histoflow.inference.voting import Votes, spread_columns

log = logging.getLogger(__name__)
FOLD_METRICS = ["image/acc", "image/balanced_acc", "image/f1_macro", "patch/acc"]


def prediction_rows(votes: Votes, classes: list[str], aggregate: str,
                    extra: Sequence[Mapping[str, Any]] | None = None, spread: bool = False) -> list[dict[str, Any]]:
    """One row per predicted image: path, any extra columns, predicted class, patch count, confidence (mean
    probability of the predicted class), vote margin ((first - second most votes) / patches), votes and mean
    probability per class (failed images are left out: they are listed as problems); spread: the models' sd of
    their mean probabilities (prob_sd_<class>) and whether they agree (models_agree), after those."""
    labels, mean = votes.labels(aggregate), votes.mean_prob()
    rows = []
    for i in votes.ok:
        top2 = np.sort(votes.votes[i])[::-1][:2]
        margin = (top2[0] - (top2[1] if len(top2) > 1 else 0)) / max(1, int(votes.patches[i]))
        row: dict[str, Any] = {"image": votes.paths[i], **(extra[i] if extra else {}),
                               "predicted": classes[labels[i]], "patches": int(votes.patches[i]),
                               "confidence": round(float(mean[i][labels[i]]), 6),
                               "vote_margin": round(float(margin), 6)}
        row.update({f"votes_{c}": int(v) for c, v in zip(classes, votes.votes[i])})
        row.update({f"prob_{c}": round(float(p), 6) for c, p in zip(classes, mean[i])})
        if spread and votes.model_prob_sum is not None:
            row.update(spread_columns(votes.model_prob_sum[i] / max(1, int(votes.patches[i])), classes))
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> Path:
    """Rows as a CSV with a header (the first row's keys unless columns are given)."""
    columns = columns or (list(rows[0]) if rows else ["image"])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _scores(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, float]:
    """From the rows' confusion matrix, the metrics whose intervals group_bootstrap gives (image accuracy, balanced
    accuracy: the mean recall over the classes present, macro F1: classes absent from truth and predictions
    ignored), and patch accuracy."""
    n = len(classes)
    truth = np.array([classes.index(r["label"]) for r in rows])
    preds = np.array([classes.index(r["predicted"]) for r in rows])
    cm = np.bincount(truth * n + preds, minlength=n * n).reshape(n, n)
    right_patches = sum(r[f"votes_{r['label']}"] for r in rows)
    return {**{name: float(metric(cm)) for name, metric in METRICS.items()},
            "patch/acc": right_patches / max(1, sum(r["patches"] for r in rows))}


def _roc_auc(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any] | None:
    """Two classes: the pooled ROC AUC of the mean probability of the second class, with its interval over groups;
    None for more classes, or where the rows hold one class only."""
    if len(classes) != 2:
        return None
    truth = [classes.index(r["label"]) for r in rows]
    scores = [float(r[f"prob_{classes[1]}"]) for r in rows]
    value = roc_auc(truth, scores)
    if value is None:
        return None
    return {"positive": classes[1], "value": value, "interval": group_bootstrap_auc(truth, scores, _groups(rows))}


def _calibration(rows: list[dict[str, Any]], classes: list[str], png: Path, title: str) -> dict[str, Any]:
    """Expected calibration error (10 bins, torchmetrics) of the images' mean probabilities; reliability diagram."""
    probs = torch.tensor([[r[f"prob_{c}"] for c in classes] for r in rows], dtype=torch.float64)
    target = torch.tensor([classes.index(r["label"]) for r in rows])
    ece = float(multiclass_calibration_error(probs, target, len(classes), n_bins=10, norm="l1"))
    confidence, correct = probs.max(1).values.numpy(), (probs.argmax(1) == target).numpy()
    save_reliability_diagram(confidence, correct, png, f"{title}\nECE {ece:.3f}")
    return {"ece": ece, "bins": reliability_bins(confidence, correct)}


def _groups(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's patient (group); an image is its own group where the rows do not say."""
    return [str(r["group"]) if r.get("group") not in (None, "") else str(r["image"]) for r in rows]


def _interval(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """95% intervals of pooled image accuracy and macro F1 from a bootstrap over groups (patients)."""
    truth = [classes.index(r["label"]) for r in rows]
    preds = [classes.index(r["predicted"]) for r in rows]
    return {"method": "bootstrap over groups", "level": LEVEL, "resamples": RESAMPLES,
            **group_bootstrap(truth, preds, _groups(rows), len(classes))}


def _over_groups(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """The groups (how many, whether the rows named them, per fold), the intervals over groups and the case-level
    accuracy."""
    groups = _groups(rows)
    given = all(r.get("group") not in (None, "") for r in rows)
    if not given:
        log.warning("the rows name no group for some images: each such image is taken as its own group")
    per_fold: dict[Any, set[str]] = {}
    for r, g in zip(rows, groups):
        per_fold.setdefault(r["fold"], set()).add(g)
    labels = [classes.index(r["label"]) for r in rows]
    preds = [classes.index(r["predicted"]) for r in rows]
    probs = np.array([[r[f"prob_{c}"] for c in classes] for r in rows], dtype=float)
    return {"groups": {"n": len(set(groups)), "given": given, "per_fold": {f: len(g) for f, g in per_fold.items()}},
            "interval": _interval(rows, classes),
            "case_level": case_level(labels, preds, probs, groups, len(classes))}


def _colour_baselines(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """The colour-only baselines on the same folds, one per classifier: per fold, mean ± sd, pooled with its
    interval over groups."""
    fold_order = list(dict.fromkeys(r["fold"] for r in rows))
    rows = sorted(rows, key=lambda r: str(r["image"]))  # a forest's fit depends on row order: fix it
    features = colour_features([r["image"] for r in rows])
    labels, folds = [r["label"] for r in rows], [r["fold"] for r in rows]
    metrics = ("image/acc", "image/f1_macro")
    baselines = {}
    for classifier in CLASSIFIERS:
        predicted = cross_validated_predictions(features, labels, folds, classifier=classifier)
        scored = [{**r, "predicted": p} for r, p in zip(rows, predicted)]
        per_fold = {f"fold {f}": {m: v for m, v in _scores([r for r in scored if r["fold"] == f], classes).items()
                                  if m in metrics} for f in fold_order}
        pooled = {m: v for m, v in _scores(scored, classes).items() if m in metrics}
        baselines[classifier] = {"per_fold": per_fold, "summary": summarize_folds(per_fold), "pooled": pooled,
                                 "interval": _interval(scored, classes)}
    return baselines


def absent_classes(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    """The model's classes that no row is truly of: every image (slide, patient) of theirs was left out, so the
    report's figures say nothing of them."""
    present = {r["label"] for r in rows}
    return [c for c in classes if c not in present]


def absent_warning(absent: Sequence[str], unit: str) -> str:
    """The report's and the headline's word on classes without a row (absent_classes); empty where none."""
    if not absent:
        return ""
    named = ", ".join(repr(c) for c in absent)
    return (f"no {unit} of class{'es' * (len(absent) > 1)} {named} in this report (every one left out: see Left "
            "out): the figures say nothing of it, and the head still predicts it")


def fold_report(rows: list[dict[str, Any]], classes: list[str], out_dir: Path, settings: Mapping[str, Any],
                problems: Sequence[Problem] = (), missing_folds: Sequence[str] = (),
                colour: bool = True) -> dict[str, Any]:
    """Write report.json, report.md, confusion_images/confusion_patches (CSV, PNG) and reliability_images.png of
    held-out predictions, with the colour-only baseline on the same folds.

    rows need image, fold, label, predicted, patches, votes_<class> and prob_<class>, and should have group (the
    patient: intervals resample groups; without it each image is its own group, and the report says so); returns
    the report as a dict. colour=False: no colour-only baseline (rows that are not image files: patient bags).
    """
    if not rows:
        raise ValueError("no image was predicted: nothing to report")
    folds = list(dict.fromkeys(r["fold"] for r in rows))
    per_fold = {f"fold {f}": _scores([r for r in rows if r["fold"] == f], classes) for f in folds}
    summary = summarize_folds(per_fold)
    pooled = _scores(rows, classes)
    n = len(classes)
    truth = np.array([classes.index(r["label"]) for r in rows])
    preds = np.array([classes.index(r["predicted"]) for r in rows])
    cm_images = np.bincount(truth * n + preds, minlength=n * n).reshape(n, n)
    cm_patches = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm_patches, truth, np.array([[r[f"votes_{c}"] for c in classes] for r in rows]))
    title = f"{len(rows)} held-out images, {len(folds)} folds"
    save_confusion_matrix(cm_images, classes, out_dir / "confusion_images", f"images: {title}")
    save_confusion_matrix(cm_patches, classes, out_dir / "confusion_patches", f"patches: {title}")
    wrong = [r for r in rows if r["predicted"] != r["label"]]
    calibration = _calibration(rows, classes, out_dir / "reliability_images.png", f"images: {title}")
    report = {
        "settings": dict(settings), "classes": classes, "images": len(rows),
        "images_per_fold": {f: sum(r["fold"] == f for r in rows) for f in folds},
        "per_fold": per_fold, "summary": summary, "pooled": pooled,
        "confusion_images": cm_images.tolist(), "confusion_patches": cm_patches.tolist(),
        "misclassified": wrong, "problems": [asdict(p) for p in problems], "missing_folds": list(missing_folds),
        "absent_classes": absent_classes(rows, classes),
        "calibration": calibration, "roc_auc": _roc_auc(rows, classes),
        "colour_baselines": _colour_baselines(rows, classes) if colour else {}, **_over_groups(rows, classes),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(_markdown(report, rows, classes))
    return report


def _ci(interval: Sequence[float]) -> str:
    return f"{interval[0]:.3f}–{interval[1]:.3f}"


def _degenerate(interval: Sequence[float], cases: Mapping[str, Any]) -> list[str]:
    """Where every bootstrap resample scores alike (all right, or all wrong), a line with the exact binomial
    interval over the cases instead: 10 of 10 patients right is not certainty."""
    if interval[0] != interval[1]:
        return []
    low, high = cases["exact"]
    return [f"Every resample scores {interval[0]:.3f}: a bootstrap cannot look past the {cases['groups']} cases it "
            f"has. Taking each case as one trial, the exact (Clopper-Pearson) 95% interval of {cases['right']}/"
            f"{cases['groups']} cases right is {low:.3f}–{high:.3f}.", ""]


def _markdown(report: dict[str, Any], rows: list[dict[str, Any]], classes: list[str]) -> str:
    s, pooled, ci, cases, groups = (report["settings"], report["pooled"], report["interval"], report["case_level"],
                                    report["groups"])
    right = sum(r["predicted"] == r["label"] for r in rows)
    sources = s.get("ckpt_path", "")
    listed = isinstance(sources, list)  # an ensemble: one model per entry and fold
    ensemble = f"the {len(sources)} models (probabilities averaged)" if listed and len(sources) > 1 else "the model"
    unit = s.get("bag_level") or "image"  # a bag head's report: its rows are images, slides or patients
    bags, tiles = "bag_level" in s, "tile" if "bag_level" in s else "patch"
    over = f"over {groups['n']} groups"
    names = {"image/acc": f"{unit} acc", "image/balanced_acc": f"{unit} balanced acc",
             "image/f1_macro": f"{unit} macro F1", "patch/acc": f"{tiles} acc"}
    auc = report.get("roc_auc")
    warning = absent_warning(report.get("absent_classes") or [], unit)
    lines = [f"# {unit.capitalize()}-level prediction report: {' + '.join(sources) if listed else sources}", "",
             *([f"**Warning**: {warning}.", ""] if warning else []),
             (f"{report['images']} new {unit}s (external validation), each predicted by all "
              f"{s.get('models', '')} fold models together (probabilities averaged). " if s.get("external") else
              f"{report['images']} {unit}s in {len(report['per_fold'])} folds, each predicted only by {ensemble} of "
              "the fold that held it out of training. ")
             +
             f"Aggregate: {s.get('aggregate')}; TTA views: {s.get('views')}; grid: {s.get('window')}-px windows, "
             f"stride {s.get('stride')}.", "",
             # an external report is one "fold" (every fold model together): no table of one row with sd 0
             *([] if s.get("external") else [
                 "## Per fold (mean ± sd, ddof=1, over folds)", "",
                 folds_markdown(report["per_fold"], report["summary"], FOLD_METRICS, names),
                 f"{unit.capitalize()}s per fold: "
                 + ", ".join(f"{f}: {k}" for f, k in report["images_per_fold"].items()) + ".", ""]),
             "## Pooled over folds", "", "| metric | value |", "|---|---:|",
             f"| {unit} accuracy | {pooled['image/acc']:.3f} ({right}/{len(rows)}; 95% CI {_ci(ci['image/acc'])} "
             f"{over}) |",
             f"| {unit} balanced accuracy | {pooled['image/balanced_acc']:.3f} (95% CI "
             f"{_ci(ci['image/balanced_acc'])} {over}) |",
             f"| {unit} macro F1 | {pooled['image/f1_macro']:.3f} (95% CI {_ci(ci['image/f1_macro'])} {over}) |",
             *([f"| {unit} ROC AUC ({auc['positive']} positive) | {auc['value']:.3f} (95% CI "
                f"{_ci(auc['interval'])} {over}) |"] if auc else []),
             *([] if unit == "patient" else  # a patient bag is its case: the same figure as the accuracy
               [f"| case-level accuracy (majority of a case's {unit}s) | {cases['acc']:.3f} ({cases['right']}/"
                f"{cases['groups']}; 95% CI {_ci(cases['interval'])}) |"]),
             f"| {'tile accuracy (the bag head on each tile alone)' if bags else 'patch accuracy'} | "
             f"{pooled['patch/acc']:.3f} |",
             f"| expected calibration error ({unit}s, 10 bins) | {report['calibration']['ece']:.3f} |", "",
             f"Intervals: {ci['resamples']} bootstrap resamples of the {groups['n']} "
             + ((f"groups (patients), each taking all its {unit}s: {unit}s of one patient are not independent, so "
                 "the effective sample is the patients." if unit != "patient" else "patients.") if groups["given"] else
                f"{unit}s (the rows name no groups: each {unit} is taken as its own patient).")
             + " Groups per fold: " + ", ".join(f"{f}: {k}" for f, k in groups["per_fold"].items()) + ".", "",
             *_degenerate(ci["image/acc"], cases),
             f"Reliability of the {unit}s' probabilities: `reliability_images.png`.", "",
             *(["Attention: `attention_maps/` (a map over each held-out image or slide, from the fold that held it "
                "out) and `attention_gallery.png` (the most and least attended tiles per class).", ""] if bags else []),
             *(["## Colour-only baselines on the same folds", "",
                "Mean and sd of R, G, B per image, and a classifier fit on the other folds: how much colour alone "
                "explains (a linear model can hide what colour tells).", ""] if report["colour_baselines"] else []),
             *[line for name, baseline in report["colour_baselines"].items()
               for line in (f"**{COLOUR_NAMES[name]}**: pooled accuracy {baseline['pooled']['image/acc']:.3f} "
                            f"(95% CI {_ci(baseline['interval']['image/acc'])} {over})", "",
                            folds_markdown(baseline["per_fold"], baseline["summary"],
                                           ["image/acc", "image/f1_macro"]))],
             f"## Confusion matrix of {unit}s (rows: true, columns: predicted)", "",
             *matrix_markdown(np.array(report["confusion_images"]), classes), "",
             f"![{unit} confusion matrix](confusion_images.png)", "",
             f"{tiles.capitalize()}s: `confusion_patches.csv` / `.png`. Every {unit}: `predictions.csv`.", "",
             f"## Misclassified {unit}s ({len(report['misclassified'])})", ""]
    if report["misclassified"]:
        lines += [f"| {unit} | fold | true | predicted | votes (" + " / ".join(classes) + ") | mean probability |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['image']} | {r['fold']} | {r['label']} | {r['predicted']} | "
                  + " / ".join(str(r[f"votes_{c}"]) for c in classes) + " | "
                  + " / ".join(f"{r[f'prob_{c}']:.2f}" for c in classes) + " |" for r in report["misclassified"]]
    else:
        lines.append("None.")
    if report["problems"]:
        lines += ["", f"## Left out ({len(report['problems'])})", ""]
        lines += [f"- {p['detail']}" if p["path"] in p["detail"] else f"- `{p['path']}` ({p['kind']}): {p['detail']}"
                  for p in report["problems"]]
    if report["missing_folds"]:
        lines += ["", f"Folds without a model (their images are not in this report): {report['missing_folds']}."]
    return "\n".join(lines) + "\n"
