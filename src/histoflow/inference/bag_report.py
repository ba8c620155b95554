"""The k-fold report of a multirun of bag heads (model=abmil|mean_pool|max_pool): each fold's held-out bag
predictions (<job>/bag_predictions.csv, training/bag_outputs.py) pooled into the image report's files and summary
(inference/image_report.fold_report): per fold, mean ± sd, pooled with 95% intervals over patients, case-level
accuracy, the colour-only baseline where the bags are images. The bag's own prediction replaces the patch vote;
`votes_<class>` count the head's verdicts on each tile taken alone (the report's patch accuracy).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from histoflow.common.errors import MissingInputError
from histoflow.data.images import read_rgb
from histoflow.data.problems import Problem
from histoflow.inference.image_report import fold_report, log_wandb, write_csv
from histoflow.training.bag_outputs import ATTENTION, PREDICTIONS, read_bag_predictions

GALLERY = "attention_gallery.png"


def bag_runs(sweep: str | Path) -> list[Path]:
    """The job folders of a multirun that hold bag predictions, in job order."""
    runs = [p.parent for p in Path(sweep).glob(f"*/{PREDICTIONS}")]
    return sorted(runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def wandb_of(run: Path) -> dict[str, Any] | None:
    """The W&B run settings of a report on a sweep whose job `run` logged to W&B (its logger.wandb); else None."""
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    logger = OmegaConf.load(config).get("logger") or {}
    if "wandb" not in logger:
        return None
    wandb = logger["wandb"]
    try:
        group = str(wandb.get("group"))
    except Exception:  # an interpolation of the Hydra run that wrote it
        group = None
    return {"project": wandb.get("project", "histoflow"), "entity": wandb.get("entity"), "group": group,
            "name": f"{group}-report" if group else None, "job_type": "report"}


def write_bag_report(sweep: str | Path, out: Path | None = None,
                     wandb: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """<sweep>/image_report/: report.json, report.md, predictions.csv, confusion and reliability figures, the
    attention gallery; logged to W&B (metrics, figures, misclassified bags) where the sweep's jobs logged there, or
    `wandb` (wandb.init arguments) says so."""
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
    images = {"report/confusion_images": out / "confusion_images.png"}
    if first.get("level") == "image":
        images["report/attention_gallery"] = attention_gallery(runs, first["classes"], out / GALLERY)
    wandb = wandb if wandb is not None else wandb_of(runs[0])
    if wandb:
        metrics = {"report/acc": report["pooled"]["image/acc"], "report/f1_macro": report["pooled"]["image/f1_macro"],
                   "report/acc_low": report["interval"]["image/acc"][0],
                   "report/acc_high": report["interval"]["image/acc"][1],
                   "report/case_acc": report["case_level"]["acc"]}
        log_wandb(out, settings, wandb, metrics, images, {"report/misclassified": report["misclassified"]})
    return report


def attended_tiles(runs: list[Path]) -> list[tuple[float, float, str, int, int, int, int, str]]:
    """Every held-out tile of the runs: (attention, attention x bag size, image path, x, y, rot, side, true class);
    attention x bag size is 1 for a tile weighted as in a mean (bags of different sizes compare)."""
    tiles = []
    for run in runs:
        rows, record = read_bag_predictions(run)
        with np.load(run / ATTENTION) as z:
            for i, row in enumerate(rows):
                a, coords = z[f"attention_{i}"], z[f"coords_{i}"]
                tiles += [(float(w), float(w) * len(a), row["image"], int(c[1]), int(c[2]), int(c[3]),
                           int(record["side"]), row["label"]) for w, c in zip(a, coords)]
    return tiles


def attention_gallery(runs: list[Path], classes: list[str], png: Path, k: int = 6) -> Path:
    """A PNG of the k most and k least attended held-out tiles of each true class (attention relative to a mean's
    1/N), the window as it lies in its image (rotation 0)."""
    tiles = attended_tiles(runs)
    fig = Figure(figsize=(1.6 * k, 1.75 * 2 * len(classes)))
    axes = fig.subplots(2 * len(classes), k, squeeze=False)
    images: dict[str, np.ndarray] = {}
    for c, name in enumerate(classes):
        ranked = sorted((t for t in tiles if t[7] == name), key=lambda t: -t[1])
        for r, (which, chosen) in enumerate((("most", ranked[:k]), ("least", ranked[::-1][:k]))):
            for j in range(k):
                ax = axes[2 * c + r][j]
                ax.set_xticks([]), ax.set_yticks([])
                if j >= len(chosen):
                    ax.axis("off")
                    continue
                _, rel, path, x, y, _, side, _ = chosen[j]
                if path not in images:
                    images[path] = read_rgb(path)[0]
                ax.imshow(images[path][y:y + side, x:x + side])
                ax.set_title(f"{rel:.2f}x", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"{name}\n{which}", fontsize=8)
    fig.suptitle("Held-out tiles by attention (x: relative to a mean's 1/N), most and least per true class", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return png


def _problems(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
