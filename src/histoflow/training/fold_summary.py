"""Cross-validation summary of a multirun: per-fold test metrics, mean ± sd, pooled confusion matrix.

Runs by itself at the end of `histoflow train -m fold=1,2,3,4,5` (a Hydra callback in conf/train.yaml; the k-fold
image-level report, histoflow.inference.sweep_report, is the next one), or later on any multirun folder:
`histoflow summary outputs/train/multirun/<date>`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from histoflow.data.folds import SplitConfig, protocol_of
from histoflow.evaluation.figures import save_confusion_matrix
from histoflow.evaluation.tables import (
    folds_markdown,
    matrix_markdown,
    read_confusion_csv,
    summarize_folds,
)
from histoflow.training.outputs import CONFUSION_FILE, METRICS_FILE, REPORT_DIR, SUMMARY_FILE, job_order

log = logging.getLogger(__name__)
VAL_CONFUSION = "confusion_val.csv"  # the job's last validation, by PatchClassifier (the same images every epoch)


def validation_gaps(run: Path) -> list[str]:
    """The classes a job's validation held no patch of (empty rows of its confusion_val.csv); [] where it held every
    class or wrote no matrix."""
    path = run / VAL_CONFUSION
    if not path.is_file():
        return []
    cm, names = read_confusion_csv(path)
    return [name for name, row in zip(names, cm) if row.sum() == 0]


def _footnotes(per_fold: dict[str, dict[str, float]], shown: list[str], gaps: dict[str, list[str]]) -> list[str]:
    """What a "–" in the table means: a metric the run did not compute, or a macro score of a validation that lacked
    classes (a mean of per-class scores over the classes it held: 0.000 where the net predicted an absent class)."""
    notes = []
    if gaps:
        notes.append("–: not computed over every class. The validation of " + "; ".join(
            f"{fold} held no {' or '.join(missing)} patch" for fold, missing in gaps.items()) + f" ({VAL_CONFUSION} "
            "in its job folder): its macro scores (val/...macro...) are left out, and the mean ± sd is over the other "
            "runs. Fix: data.split.val_groups_per_class=2 (every class in every run's validation), and enough "
            "trainer.limit_val_batches to reach them.")
    if any(m not in scores for scores in per_fold.values() for m in shown) and not gaps:
        notes.append("–: not computed in that run.")
    return [*notes, ""] if notes else []


def summarize_sweep(sweep_dir: str | Path) -> Path | None:
    """Write summary.md, summary.json and confusion_pooled.csv/png into sweep_dir; None when no job finished."""
    sweep_dir = Path(sweep_dir)
    per_fold: dict[str, dict[str, float]] = {}
    jobs: dict[str, str] = {}  # the job folder of each row: Hydra numbers them from 0, folds count from 1
    gaps: dict[str, list[str]] = {}  # the runs whose validation lacked classes: their val macro scores left out
    pooled: np.ndarray | None = None
    classes: list[str] | None = None
    for metrics_path in sorted(sweep_dir.glob(f"*/{METRICS_FILE}"), key=job_order):
        metrics: dict[str, Any] = json.loads(metrics_path.read_text())
        key = f"fold {metrics['fold']}"
        if key in per_fold:  # a sweep over more than folds: say which job
            key += f" (job {metrics_path.parent.name})"
        per_fold[key] = {k: v for k, v in metrics.items() if isinstance(v, float) and not k.startswith("train/")}
        missing = validation_gaps(metrics_path.parent)
        if missing:  # a macro mean over the classes validated, not over the classes: 0.000 that looks like a failure
            gaps[key] = missing
            per_fold[key] = {k: v for k, v in per_fold[key].items() if not (k.startswith("val/") and "macro" in k)}
        jobs[key] = f"{metrics_path.parent.name}/"
        confusion_path = metrics_path.parent / CONFUSION_FILE
        if confusion_path.is_file():
            cm, names = read_confusion_csv(confusion_path)
            if classes not in (None, names):
                raise ValueError(f"{confusion_path}: classes {names} differ from the other folds' {classes}")
            pooled, classes = (cm if pooled is None else pooled + cm), names
    if not per_fold:
        log.warning("no %s under %s: no job finished, no summary", METRICS_FILE, sweep_dir)
        return None

    summary = summarize_folds(per_fold)
    configs = sorted(sweep_dir.glob("*/.hydra/config.yaml"), key=job_order)
    data = OmegaConf.to_container(OmegaConf.load(configs[0]).data, resolve=False) if configs else {}
    protocol = protocol_of(data)
    shown = sorted(m for m in summary if m.startswith("test/")) + sorted(m for m in summary if m.endswith("_best"))
    lines = [f"# Cross-validation summary: {sweep_dir}", "",
             f"{len(per_fold)} runs; mean ± sd (ddof=1) over runs. Protocol: {protocol} (the data config of the first "
             "job).", "", folds_markdown(per_fold, summary, shown), *_footnotes(per_fold, shown, gaps),
             "Job folders: " + ", ".join(f"{key} in {folder}" for key, folder in jobs.items()) + ".", ""]
    if pooled is not None and classes is not None:
        save_confusion_matrix(pooled, classes, sweep_dir / "confusion_pooled", f"pooled test folds ({len(per_fold)})")
        lines += ["## Pooled test confusion matrix (rows: true, columns: predicted)", "",
                  *matrix_markdown(pooled, classes)]
        lines += ["", "![pooled confusion matrix](confusion_pooled.png)", ""]
    out = sweep_dir / "summary.md"
    out.write_text("\n".join(lines))
    report = sweep_dir / REPORT_DIR / "report.json"  # written after this summary; kept when it is written again
    keys = json.loads(report.read_text()).get("keys") if report.is_file() else None
    (sweep_dir / SUMMARY_FILE).write_text(json.dumps(
        {"protocol": protocol, "per_fold": per_fold, "jobs": jobs, "summary": summary, "validation_gaps": gaps,
         "pooled_confusion": None if pooled is None else pooled.tolist(), "classes": classes,
         **({"report": keys} if keys else {})}, indent=1))
    log.info("cross-validation summary: %s\n%s", out, folds_markdown(per_fold, summary, shown))
    return out


def swept(config: DictConfig, key: str) -> list[str]:
    """The values a multirun's command line gives `key` (one, or a sweep's)."""
    for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if override.get_key_element().lstrip("+~") == key:
            if override.is_sweep_override():
                return list(override.sweep_string_iterator())
            return [override.get_value_element_as_str()]
    return []


def folds_not_in_split(config: DictConfig) -> list[str]:
    """The swept folds that a k-fold or fractions split does not have (leave one group out: not known before the
    data are listed, so none)."""
    split = SplitConfig.from_config(config.data.get("split"))
    if split.kind == "leave_one_group_out":
        return []
    return [fold for fold in swept(config, "fold") if fold not in split.test_folds()]


def describe_split(config: DictConfig) -> str:
    split = SplitConfig.from_config(config.data.get("split"))
    return f"kind={split.kind}" + (f", k={split.k}" if split.kind == "kfold" else "")


class FoldSummary(Callback):
    """Hydra callback of a training multirun: before its first job, refuse folds the data do not have; once every
    job has returned, summarise the folds' patch-level test metrics (summary.md)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a sweep over folds the data do not have before its first job: `fold=1,6` with five folds once
        trained fold 1, then failed on 6 and wrote no summary. (SystemExit passes through Hydra's callbacks.)"""
        bad = folds_not_in_split(config)
        if bad:
            log.error("fold=%s: not folds of data.split (%s). Fix: sweep over %s", ",".join(bad),
                      describe_split(config), ",".join(SplitConfig.from_config(config.data.get("split")).test_folds()))
            raise SystemExit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize_sweep(config.hydra.sweep.dir)
