"""A slide- or patient-bag multirun put to work on a new cohort (docs/prediction.md):

    histoflow predict ckpt_path=<multirun of experiment=slides_abmil> slides=<table.csv | folder>
                      [slide.export=[geojson]]

The new slides go through the cohort store as training's did (features/cohort.py embed_cohort with the checkpoint's
encoder and tiling: content-keyed per-slide feature files, so slides training embedded are found, not embedded
again; kill -9 safe; several processes, `features.devices`, `features.chunk=i/n` as `histoflow embed`), then each
fold's head on each bag (a slide, or a patient's slides pooled as in training), the fold models averaged:

    <out>/cohort.csv            the slides as the embedding read them (absolute paths; label `unlabelled` without)
    <out>/slides.csv            a row per slide: output (the name of its files below), patient, label, tiles, its
                                bag's prediction (predicted, confidence, prob_<class> the fold models' mean,
                                prob_sd_<class> their sd, models_agree, and prob_<class>_fold<k> each fold model's)
    <out>/patients.csv          a row per patient: its bag (patient bags), or its slides' mean (slide bags)
    <out>/bags/                 the bags in a fold run's form (bag_predictions.csv, bags.json, attention.npz)
    <out>/attention_maps/, attention_gallery.png      as the k-fold report's (inference/attention_maps.py)
    <out>/slides/<stem>.tiles.csv, .map.npy, .json    each tile's own class probabilities (the fold models' mean),
                                the viewer's probability overlay; .geojson with slide.export=[geojson]: QuPath objects
    <out>/report.md, report.json, ...   where the table has a label column: the external validation
                                (deployment/external_report.py)

A survival or regression head (task=survival|regression in its checkpoint) gives instead a `risk` or `value` per
slide and patient (the fold models' mean, `risk_sd` their sd, `risk_fold<k>` each fold model's; no tile verdicts,
no slides/ folder), the attention maps and the gallery by predicted risk half or value quartile, and, where the table
has the checkpoint's target columns (time,event or target), the report of a k-fold run for one external fold
(inference/target_report.py: C-index with its interval over patients, Kaplan-Meier, log-rank; MAE, R², r).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.common.files import atomic_path
from histoflow.data.problems import Problem
from histoflow.deployment.bag_heads import FoldPredictions, fold_columns, predict_bags
from histoflow.deployment.external_report import EXTERNAL, external_task_report, external_validation
from histoflow.deployment.predict import files_matching
from histoflow.deployment.slide_outputs import write_bag_folder, write_slide_outputs
from histoflow.features.bags import Bag
from histoflow.features.cohort import embed_cohort, prepare_job
from histoflow.features.cohort_job import ENCODER_SIDE
from histoflow.features.slide_features import read_slide_features
from histoflow.inference.attention_maps import (
    GALLERY,
    QUARTILES,
    RISK_HALVES,
    attention_gallery,
    write_attention_maps,
)
from histoflow.inference.fold_models import BagHeadModel, is_slide_bag_checkpoint, load_bag_heads
from histoflow.inference.heatmap import output_names
from histoflow.inference.image_report import write_csv
from histoflow.inference.model_settings import check_settings, model_encoder, model_tiling, refuse_slide_changes
from histoflow.inference.voting import prediction_columns, value_columns
from histoflow.slides.backend import SLIDE_SUFFIXES

log = logging.getLogger(__name__)
UNLABELLED = "unlabelled"  # the label column of cohort.csv where the new slides carry none


@dataclass
class NewSlide:
    """A slide to predict: its file, patient, label (None: unknown) and the table's other columns."""

    path: Path
    patient: str
    label: str | None
    extra: dict[str, str] = field(default_factory=dict)


def read_new_cohort(spec: str | Sequence[str], classes: Sequence[str]) -> list[NewSlide]:
    """The new slides: a table (slide[,patient][,label][,...]; paths relative to it) or slide files (each its own
    patient, no label). A label unknown to the model is a ConfigError naming it, before any work."""
    if not (isinstance(spec, str) and spec.lower().endswith(".csv")):
        return [NewSlide(p.resolve(), p.stem, None) for p in files_matching(spec, SLIDE_SUFFIXES, key="slides")]
    table = Path(spec).expanduser()
    if not table.is_file():
        raise MissingInputError(f"slides={spec}: no such slide table. Fix: check the path")
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "slide" not in rows[0]:
        raise ConfigError(f"slides={spec}: a slide table needs a column `slide` (and may have patient, label and "
                          f"more; found: {list(rows[0]) if rows else 'no row'})")
    labelled = "label" in rows[0]
    slides = []
    for number, row in enumerate(rows, 2):
        label = (row.get("label") or "").strip() if labelled else None
        if labelled and not label:
            raise ConfigError(f"{table}, row {number}: the label column is empty. Fix: give every slide its label, "
                              "or drop the column (predictions only)")
        if label is not None and label not in classes:
            raise ConfigError(f"{table}, row {number}: label {label!r} is unknown to the model, whose classes are "
                              f"{list(classes)}. Fix: correct the label, leave the slide out, or drop the label column "
                              "(predictions only)")
        path = Path(row["slide"]).expanduser()
        path = (path if path.is_absolute() else table.parent / path).resolve()
        extra = {k: v for k, v in row.items() if k not in ("slide", "patient", "label") and k}
        slides.append(NewSlide(path, (row.get("patient") or "").strip() or path.stem, label, extra))
    return slides


def write_cohort_table(slides: Sequence[NewSlide], out: Path) -> tuple[Path, str]:
    """cohort.csv, what the cohort's embedding reads, and its content's name (the same slides name the same index,
    so a rerun after an interruption finds its parts)."""
    lines = ["slide,patient,label"] + [",".join(_cell(v) for v in (str(s.path), s.patient, s.label or UNLABELLED))
                                       for s in slides]
    text = "\n".join(lines) + "\n"
    path = out / "cohort.csv"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path, "predict-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _cell(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


def _bags(index: Path, slides: Sequence[NewSlide], classes: Sequence[str], level: str) -> tuple[list[Bag], dict]:
    """The bags of the embedded slides (a slide's, or a patient's slides pooled in the table's order) and each
    slide's index row by its path."""
    with index.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_path = {str(s.path): s for s in slides}
    singles, found = [], {}
    for number, row in enumerate(rows):
        slide = by_path[row["slide"]]
        data = read_slide_features(index.parent / row["shard"])
        if not len(data["features"]):
            continue
        found[row["slide"]] = {**row, "number": number, "shard": str(index.parent / row["shard"])}
        px = np.asarray(data["coords_px"], dtype=np.int64).reshape(-1, 2)
        coords = np.column_stack([np.full(len(px), number), px, np.zeros(len(px), dtype=np.int64)])
        label = classes.index(slide.label) if slide.label else 0  # bag_outputs names a class; unused unlabelled
        singles.append(Bag(row["slide"], label, torch.from_numpy(data["features"]).float(), coords, slide.patient,
                           EXTERNAL, [row["slide"]], coords_um=np.asarray(data["coords_um"])))
    if level != "patient":
        return singles, found
    pooled: dict[str, list[Bag]] = {}
    for b in singles:
        pooled.setdefault(b.group, []).append(b)
    return [Bag(p, ms[0].label, torch.cat([b.features for b in ms]), np.concatenate([b.coords for b in ms]), p,
                EXTERNAL, [i for b in ms for i in b.images], coords_um=np.concatenate([b.coords_um for b in ms]))
            for p, ms in pooled.items()], found


def _rows(slides: Sequence[NewSlide], bags: Sequence[Bag], pred: FoldPredictions, models: Sequence[BagHeadModel],
          found: dict, labelled: bool, names: dict[Path, str]) -> tuple[list[dict], list[dict], list[dict]]:
    """slides.csv's and patients.csv's rows (`output`: the name of the slide's files in slides/ and attention_maps/),
    and the bag rows (the k-fold report's form)."""
    classes = models[0].classes
    bag_of = {name: i for i, b in enumerate(bags) for name in b.images}
    slide_rows = []
    for s in slides:
        key = str(s.path)
        if key not in found:
            continue
        i = bag_of[key]
        row = {"slide": key, "output": names[s.path], "patient": s.patient,
               **({"label": s.label} if labelled else {}), **s.extra,
               "tiles": int(found[key]["tiles"]), "bag": bags[i].name}
        slide_rows.append({**row, **prediction_columns(pred.probs[i], classes), **fold_columns(pred.probs[i], models)})
    patient_rows = []
    label_of = {s.patient: s.label for s in slides}
    for patient in dict.fromkeys(s.patient for s in slides if str(s.path) in found):
        members = sorted({bag_of[str(s.path)] for s in slides if s.patient == patient and str(s.path) in found})
        per_model = pred.probs[members].mean(0)  # one bag (patient bags), or its slides' mean (slide bags)
        patient_rows.append({"patient": patient, **({"label": label_of[patient]} if labelled else {}),
                             "slides": sum(1 for s in slides if s.patient == patient and str(s.path) in found),
                             "tiles": sum(len(bags[i]) for i in members), **prediction_columns(per_model, classes),
                             **fold_columns(per_model, models)})
    bag_rows = []
    for i, b in enumerate(bags):
        cols = prediction_columns(pred.probs[i], classes)
        votes = np.bincount(pred.tile_probs[i].argmax(1), minlength=len(classes))
        bag_rows.append({"image": b.name, "group": b.group, "fold": EXTERNAL,
                         "label": classes[b.label] if labelled else "", "predicted": cols["predicted"],
                         "patches": len(b), **{f"votes_{c}": int(v) for c, v in zip(classes, votes)},
                         **{f"prob_{c}": cols[f"prob_{c}"] for c in classes},
                         **{k: v for k, v in cols.items() if k.startswith("prob_sd_") or k == "models_agree"}})
    return slide_rows, patient_rows, bag_rows


def predict_cohort(cfg: DictConfig, out: Path, settings: dict[str, Any]) -> tuple[list[dict], list[Problem], dict]:
    """A bag multirun on new slides (module docstring); returns slides.csv's rows, the slides left out and what a
    W&B run would log."""
    models = load_bag_heads(str(cfg.ckpt_path), cfg.trusted_targets)
    first, classes = models[0], models[0].classes
    refuse_slide_changes(cfg, first)  # what the model sees comes from its checkpoint: before any work
    spec = cfg.slides if isinstance(cfg.slides, str) else list(cfg.slides)
    slides = read_new_cohort(spec, classes)
    labelled = all(s.label is not None for s in slides)
    table, name = write_cohort_table(slides, out)
    features = {k: v for k, v in to_builtin(cfg.get("features") or {}).items() if v is not None}
    run_cfg = {"out": first.config["data"].get("features", {}).get("out"), **features, "name": name}
    encoder, tiling = model_encoder(cfg, first), model_tiling(cfg, first)
    check_settings(prepare_job(table, encoder, tiling, run_cfg, "skip").settings, first)  # before any slide
    result = embed_cohort(table, encoder, tiling, run_cfg, on_bad_image="skip")
    if result.rank != 0 or result.index is None:  # a further device, or a chunk before the last
        log.info("features of this job's slides in %s; the predictions are written by the job that completes the "
                 "cohort's index", result.folder)
        return [], [], {}
    problems = _left_out(result.folder / f"{name}.problems.csv")
    bags, found = _bags(result.index, slides, classes, first.level)
    if not bags:
        raise MissingInputError(f"{cfg.slides}: no slide gave a tissue tile ({len(problems)} left out, listed in "
                                f"{out / 'problems.csv'}); nothing to predict")
    pred = predict_bags(models, bags)
    # one name per slide for every output (the table's order, as `histoflow predict slides=` names them): the
    # attention maps list slides bag by bag, which for patient bags is another order
    names = output_names([s.path for s in slides if str(s.path) in found])
    if first.task.name != "classification":  # a risk or value per slide and patient (module docstring)
        return _task_outputs(cfg, out, slides, bags, pred, models, found, settings, problems, result.folder, names)
    slide_rows, patient_rows, bag_rows = _rows(slides, bags, pred, models, found, labelled, names)
    write_csv(slide_rows, out / "slides.csv")
    write_csv(patient_rows, out / "patients.csv")
    bag_dir = write_bag_folder(out / "bags", bags, bag_rows, pred, found, classes, first.level)
    write_attention_maps([bag_dir], out, names)
    attention_gallery([bag_dir], classes, out / GALLERY, by="label" if labelled else "predicted")
    exports = cfg.slide.get("export") or []
    write_slide_outputs(out, bags, pred, found, bag_rows, classes, "geojson" in (
        [exports] if isinstance(exports, str) else list(exports)), names)
    settings = {**settings, "models": len(models), "bag_level": first.level, "features": str(result.folder),
                "aggregate": f"bag ({type(first.head).__name__}, {first.level} bags), the {len(models)} fold "
                             "models' mean",
                "window": tiling.get("tile_size") or ENCODER_SIDE,
                "stride": tiling.get("stride") or tiling.get("tile_size") or ENCODER_SIDE, "views": 1}
    logged: dict[str, Any] = {"metrics": {"predict/slides": float(len(slide_rows))}, "images": {},
                              "tables": {"predict/slides": slide_rows, "predict/patients": patient_rows}}
    if labelled:
        report = external_validation(bag_rows, classes, out, settings, problems, "slides.csv and patients.csv")
        logged["metrics"].update({f"predict/external/{k}": v for k, v in report["pooled"].items()})
    else:
        log.info("the new slides carry no labels (%s has no label column): predictions only, no report", cfg.slides)
    (out / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    return slide_rows, problems, logged


def _task_outputs(cfg: DictConfig, out: Path, slides: Sequence[NewSlide], bags: Sequence[Bag], pred: FoldPredictions,
                  models: Sequence[BagHeadModel], found: dict, settings: dict[str, Any], problems: list[Problem],
                  features: Path, names: dict[Path, str]) -> tuple[list[dict], list[Problem], dict]:
    """slides.csv, patients.csv, the bag folder, attention maps and gallery of a survival or regression head, and
    the external report where the table has the target's columns (`names`: each slide's outputs' name)."""
    task, level = models[0].task, models[0].level
    survival = task.name == "survival"
    targeted = all(all((s.extra.get(c) or "").strip() for c in task.columns) for s in slides)
    bag_of = {name: i for i, b in enumerate(bags) for name in b.images}
    kept = [s for s in slides if str(s.path) in found]
    slide_rows = [{"slide": str(s.path), "output": names[s.path], "patient": s.patient, **s.extra,
                   "tiles": int(found[str(s.path)]["tiles"]),
                   "bag": bags[bag_of[str(s.path)]].name, **value_columns(pred.probs[bag_of[str(s.path)]], models)}
                  for s in kept]
    patient_rows = []
    for patient in dict.fromkeys(s.patient for s in kept):
        members = sorted({bag_of[str(s.path)] for s in kept if s.patient == patient})
        own = [s for s in kept if s.patient == patient]
        patient_rows.append({"patient": patient, **({c: own[0].extra[c] for c in task.columns} if targeted else {}),
                             "slides": len(own), "tiles": sum(len(bags[i]) for i in members),
                             **value_columns(pred.probs[members].mean(0), models)})
    value = "risk" if survival else "predicted"
    first_slide = {str(s.path): s for s in kept}
    bag_rows = []
    for i, b in enumerate(bags):
        row: dict[str, Any] = {"image": b.name, "group": b.group, "fold": "external", "patches": len(b),
                               value: round(float(pred.probs[i, :, 0].mean()), 6)}
        if targeted:
            row.update({k: first_slide[b.images[0]].extra[c] for k, c in zip(
                ("time", "event") if survival else ("target",), task.columns)})
        bag_rows.append(row)
    write_csv(slide_rows, out / "slides.csv")
    write_csv(patient_rows, out / "patients.csv")
    record = {"name": task.name, "loss": task.loss, "columns": list(task.columns), "key": task.key}
    bag_dir = write_bag_folder(out / "bags", bags, bag_rows, pred, found, models[0].classes, level, task=record)
    write_attention_maps([bag_dir], out, names)
    attention_gallery([bag_dir], RISK_HALVES if survival else QUARTILES, out / GALLERY, by="predicted",
                      rows_are="predicted risk half" if survival else "quartile of the predicted value")
    settings = {**settings, "models": len(models), "bag_level": level, "features": str(features), "task": task.name}
    name = "risk" if survival else "value"
    logged: dict[str, Any] = {"metrics": {"predict/slides": float(len(slide_rows))}, "images": {},
                              "tables": {"predict/slides": slide_rows, "predict/patients": patient_rows}}
    if targeted:
        per_key = slide_rows if task.key in ("slide", "image") else patient_rows
        rows = [{"name": r.get("slide", r["patient"]), "patient": r["patient"], "fold": "external",
                 value: r[name], **{k: float(r[c]) for k, c in zip(
                     ("time", "event") if survival else ("target",), task.columns)}} for r in per_key]
        report = external_task_report(rows, task.name, out, {**settings, "unit": task.key})
        logged["metrics"].update({f"predict/external/{k}": v for k, v in report["pooled"].items()
                                  if isinstance(v, (int, float))})
    else:
        log.info("the new slides carry no %s (%s): predictions only, no report", ", ".join(task.columns), cfg.slides)
    (out / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    return slide_rows, problems, logged


def _left_out(path: Path) -> list[Problem]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [Problem(r["path"], r["kind"], r["detail"]) for r in csv.DictReader(handle)]


def is_cohort_run(cfg: DictConfig) -> bool:
    """slides=... with a head on slide or patient bags: this module's run."""
    if not cfg.get("slides") or OmegaConf.is_list(cfg.ckpt_path):
        return False
    return is_slide_bag_checkpoint(str(cfg.ckpt_path))
