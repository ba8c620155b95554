"""The smoke experiment's figures should not look like failures: every class in every run's validation (folds drawn
on the real lymphoma cases, no training), and summary.md leaves out, with a footnote, the macro scores of a
validation that held only some classes (a tiny synthetic sweep)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from histoflow.common.config import CONF_DIR
from histoflow.data.folds import SplitConfig, assign_folds, validation_gaps
from histoflow.data.sources import SourceConfig, list_images
from histoflow.evaluation.figures import save_confusion_matrix
from histoflow.training.fold_summary import summarize_sweep

CLASSES = ["CLL", "FL", "MCL"]


def test_the_smoke_validates_every_run_on_every_class(lymphoma_dir: Path) -> None:
    """`histoflow train -m experiment=smoke`: the recipe's 10% share of each fold held no CLL case in any run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # the package's configs (the code under test)
        cfg = compose("train", overrides=["experiment=smoke", f"data.root={lymphoma_dir}"])
    source = SourceConfig(**{f.name: cfg.data[f.name] for f in fields(SourceConfig) if f.name in cfg.data})
    records, _ = list_images(source, lymphoma_dir)
    labels, groups = [r.label for r in records], [r.group for r in records]
    assert sorted(set(labels)) == CLASSES and len(set(groups)) == 25  # the cases of cases.csv
    folds, val = assign_folds(labels, groups, SplitConfig.from_config(cfg.data.split))
    assert validation_gaps(labels, folds, val) == {}
    assert cfg.trainer.limit_val_batches == 1.0  # the whole validation: its first batches hold one fold's cases


def write_job(sweep: Path, job: int, metrics: dict, val_rows: np.ndarray) -> None:
    run = sweep / str(job)
    run.mkdir()
    (run / "test_metrics.json").write_text(json.dumps({**metrics, "best_checkpoint": None}))
    save_confusion_matrix(np.eye(3, dtype=np.int64) * 5, CLASSES, run / "confusion_test")
    save_confusion_matrix(val_rows, CLASSES, run / "confusion_val")


def test_summary_leaves_out_macro_scores_of_a_validation_without_some_classes(tmp_path: Path) -> None:
    """Fold 2 validated on FL and MCL only and predicted CLL throughout: its val/acc_macro_best 0.0 was shown as
    0.000 and pulled the mean down; now '–' with a footnote naming the class, the mean over the other folds."""
    full = np.array([[4, 1, 0], [0, 5, 0], [1, 0, 4]])
    partial = np.array([[0, 0, 0], [6, 0, 0], [5, 0, 0]])  # no CLL patch; every patch predicted CLL
    for job, (fold, best, matrix) in enumerate([("1", 0.8, full), ("2", 0.0, partial), ("3", 0.6, full)]):
        write_job(tmp_path, job, {"fold": fold, "test/acc_macro": 0.9, "val/acc_macro_best": best,
                                  "val/acc_micro": 0.5}, matrix)
    summary = summarize_sweep(tmp_path).read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| fold |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in summary.splitlines() if line.startswith(("| fold ", "| mean"))}
    best = columns.index("val/acc_macro_best")
    assert rows["fold 2"][best] == "–" and rows["fold 1"][best] == "0.800"
    assert rows["mean ± sd"][best].startswith("0.700")  # over folds 1 and 3 only
    assert rows["fold 2"][columns.index("test/acc_macro")] == "0.900"  # the test scores stay
    assert "fold 2 held no CLL patch" in summary and "val_groups_per_class=2" in summary
    assert json.loads((tmp_path / "summary.json").read_text())["validation_gaps"] == {"fold 2": ["CLL"]}
