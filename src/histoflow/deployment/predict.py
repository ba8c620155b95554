"""New images (`histoflow predict ... images=<folder | file | glob | list>`): every fold model's probabilities
(patch votes, or a head's bags of the training windows) averaged per image in predictions.csv with the models'
spread; where class folders give labels the external report, where a table gives survival or regression targets
theirs. files_matching: the files a run is given, images or slides."""

from __future__ import annotations

import glob
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig

from histoflow.common.errors import MissingInputError
from histoflow.data.images import IMAGE_SUFFIXES
from histoflow.data.patches import PatchConfig
from histoflow.data.problems import Problem
from histoflow.deployment.bag_predict import bag_rows, predict_bags, value_rows
from histoflow.deployment.external_report import (
    external_report,
    external_task_report,
    folder_labels,
    image_groups,
    new_image_targets,
)
from histoflow.inference.fold_models import FoldModel, check_compatible, encoder_groups
from histoflow.inference.held_out import run_options
from histoflow.inference.image_report import prediction_rows, write_csv
from histoflow.inference.voting import predict_images
from histoflow.slides.backend import SLIDE_SUFFIXES, slides_in

log = logging.getLogger(__name__)


def files_matching(spec: str | Sequence[str], suffixes: Sequence[str] | None = None,
                   key: str = "images") -> list[Path]:
    """Image files (key=slides: slide files) of a folder (searched recursively), a file, a glob pattern, or a list
    of these, in order; the files of a folder that are neither are listed in a warning."""
    suffixes = suffixes or (SLIDE_SUFFIXES if key == "slides" else IMAGE_SUFFIXES)
    found: list[Path] = []
    for entry in [spec] if isinstance(spec, str) else list(spec):
        path = Path(entry).expanduser()
        if not glob.has_magic(str(path)) and not path.exists():
            raise MissingInputError(f"{key}={entry}: no such file or folder. Fix: check the path (relative paths "
                                    f"start from {Path.cwd()})")
        if path.is_dir():
            every = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if key == "slides":
                files, skipped = slides_in(every)
            else:
                files = [p for p in every if p.suffix.lower() in suffixes]
                skipped = [p for p in every if p.suffix.lower() not in suffixes]
            if skipped:  # never in silence: a format left out looks like a slide that was not there
                kinds = Counter(p.suffix.lower() or "(no suffix)" for p in skipped)
                log.warning("%s=%s: %d file(s) skipped, not %s files histoflow reads (%s): %s%s", key, entry,
                            len(skipped), key[:-1], ", ".join(f"{n} {k}" for k, n in kinds.most_common()),
                            ", ".join(str(p.relative_to(path)) for p in skipped[:5]),
                            ", ..." if len(skipped) > 5 else "")
        elif path.is_file():
            files = [path]
        else:
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            example = "'dir/**/*.png'" if key == "images" else "'dir/*.svs'"
            raise MissingInputError(f"{key}={entry}: no {key[:-1]} files ({' '.join(suffixes)}) found there. "
                                    f"Fix: pass a folder, a file, a glob pattern such as {example}, or a list")
        found += files
    return list(dict.fromkeys(found))  # a file matched twice is predicted once


def predict_new_images(cfg: DictConfig, members: list[list[FoldModel]], grid: PatchConfig, out: Path,
                       settings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Problem], dict[str, Any]]:
    """Any images: all models' averaged probabilities (patch votes, or bag heads' bags of the training windows) per
    image in predictions.csv with the models' spread; where class folders give labels, the external report."""
    models = [m for ms in members for m in ms]
    spec = cfg.images if isinstance(cfg.images, str) else list(cfg.images)
    paths = files_matching(spec)
    classes, task = models[0].classes, models[0].task
    valued = task.name != "classification"  # a survival or regression head: a risk or value per image, no class
    labels = None if valued else folder_labels(paths, classes, str(cfg.get("labels", "auto")))  # before any work
    root = Path(spec).expanduser() if isinstance(spec, str) and Path(spec).expanduser().is_dir() else None
    groups = image_groups(paths, cfg.get("groups"), root) if labels or (valued and cfg.get("targets")) else []
    if models[0].is_bag:
        pred = predict_bags(paths, models, cfg.batch_size, run_options(cfg)["num_workers"], cfg.device,
                            cfg.progress)
        rows = value_rows(pred, models) if valued else bag_rows(pred, classes)
        problems, seconds = list(pred.problems.values()), pred.seconds
    else:
        check_compatible(models, classes, grid.size, f"checkpoint {models[0].path}")
        votes = predict_images(paths, encoder_groups(models), len(classes), grid, **run_options(cfg))
        rows, problems, seconds = prediction_rows(votes, classes, cfg.aggregate, spread=True), \
            list(votes.problems.values()), votes.seconds
    log.info("%d images in %.1f s (%.2f images/s)", len(paths), seconds, len(paths) / max(seconds, 1e-9))
    logged: dict[str, Any] = {"metrics": {"predict/images": float(len(rows))}, "images": {},
                              "tables": {"predict/predictions": rows}}
    if labels and rows:
        report = external_report(rows, paths, labels, groups, classes, out, {**settings, "models": len(models)},
                                 problems)
        logged["metrics"].update({f"predict/external/{k}": v for k, v in report["pooled"].items()})
        logged["images"]["predict/external/confusion_images"] = out / "confusion_images.png"
    elif valued and cfg.get("targets") and rows:  # survival or regression targets: the k-fold report's form
        by_path = dict(zip(map(str, paths), groups))
        report = external_task_report(new_image_targets(rows, str(cfg.targets), task, root,
                                                        [by_path[str(r["image"])] for r in rows]),
                                      task.name, out, {**settings, "models": len(models), "unit": "image"})
        logged["metrics"].update({f"predict/external/{k}": v for k, v in report["pooled"].items()
                                  if isinstance(v, (int, float))})
    elif valued:
        log.info("no targets=<table> of the new images' %s: predictions only, no report", ", ".join(task.columns))
    elif not labels:
        log.info("the images carry no labels (no folder named like a class of %s): predictions only, no report",
                 classes)
    write_csv(rows, out / "predictions.csv")
    return rows, problems, logged
