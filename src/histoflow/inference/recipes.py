"""Recipes side by side: several multirun folders' k-fold reports in one table (`histoflow summary <multirun>
<multirun> ...`), read from each one's image_report/report.json keys (inference/report_run.py), the folds' own
test metrics from its summary.json where it has no report. The same figures as the report runs' table in W&B.
A survival or regression sweep (task=survival|regression: report/cindex, report/mae ... keys) shows its own figures
in the first metric's column, its task named: `C-index 0.712 [0.60, 0.81] (survival)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from histoflow.common.errors import MissingInputError
from histoflow.inference.report_run import job_config, report_keys
from histoflow.training.outputs import REPORT_DIR, SUMMARY_FILE, job_order

COLUMNS = ["recipe", "folds", "patients", "accuracy [95% CI]", "case-level [95% CI]", "balanced acc [95% CI]",
           "macro F1 [95% CI]", "colour only [95% CI]", "accuracy over folds", "folder"]


def recipe_name(sweep: Path) -> str:
    """The sweep's experiment name (`name`, the W&B group) as its first job resolved it, else the folder's name."""
    configs = sorted(sweep.glob("*/.hydra/config.yaml"), key=lambda p: job_order(p.parent))
    name = job_config(configs[0].parent.parent).get("name") if configs else None
    return name if isinstance(name, str) and "${" not in name else sweep.name


def sweep_row(sweep: str | Path) -> dict[str, Any]:
    """One sweep's figures: its report's keys (report.json `keys`, computed from the report where an older one
    has none) and the folds' test metrics (summary.json); a folder with neither is an error naming the fix."""
    sweep = Path(sweep)
    report, summary = sweep / REPORT_DIR / "report.json", sweep / SUMMARY_FILE
    if not report.is_file() and not summary.is_file():
        raise MissingInputError(f"{sweep}: neither {REPORT_DIR}/report.json nor {SUMMARY_FILE}: not a finished "
                                f"multirun. Fix: pass a `histoflow train -m` folder, or write its summary with "
                                f"`histoflow summary {sweep}`")
    keys: dict[str, float] = {}
    if report.is_file():
        written = json.loads(report.read_text())
        keys = written.get("keys") or report_keys(written)
    folds = json.loads(summary.read_text()).get("summary", {}) if summary.is_file() else {}
    return {"recipe": recipe_name(sweep), "folder": str(sweep), "keys": keys, "folds": folds}


def _ci(keys: Mapping[str, float], name: str) -> str:
    if name not in keys:
        return "–"
    text = f"{keys[name]:.3f}"
    if f"{name}_low" in keys:
        text += f" [{keys[f'{name}_low']:.2f}, {keys[f'{name}_high']:.2f}]"
    return text


# a task's figures (inference/report_run.py task_keys): its name in the table, and the key of each figure shown
TASK_FIGURES = {"survival": [("C-index", "report/cindex")],
                "regression": [("MAE", "report/mae"), ("R²", "report/r2")]}


def task_of(keys: Mapping[str, float]) -> str | None:
    """survival or regression where the keys are a task report's, None for a classifier's."""
    return next((task for task, figures in TASK_FIGURES.items() if figures[0][1] in keys), None)


def _task_cell(keys: Mapping[str, float], task: str) -> str:
    shown = "; ".join(f"{label} {_ci(keys, key)}" for label, key in TASK_FIGURES[task] if key in keys)
    return f"{shown} ({task})"


def _over_folds(row: Mapping[str, Any]) -> str:
    keys, folds = row["keys"], row["folds"]
    task = task_of(keys)
    if task:
        label, key = TASK_FIGURES[task][0]
        if f"{key}_mean" in keys:
            return f"{keys[f'{key}_mean']:.3f} ± {keys.get(f'{key}_sd', float('nan')):.3f} ({label})"
    if "report/acc_mean" in keys:
        return f"{keys['report/acc_mean']:.3f} ± {keys['report/acc_sd']:.3f}"
    if "test/acc_macro" in folds:  # no report: the folds' patch-level test accuracy
        return f"{folds['test/acc_macro']['mean']:.3f} ± {folds['test/acc_macro']['sd']:.3f} (patches)"
    return "–"


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The sweeps as a Markdown table, one row a recipe, in the order given."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * 7 + "---|"]
    for row in rows:
        keys = row["keys"]
        folds = int(keys.get("report/folds", next(iter(row["folds"].values()), {}).get("n", 0)))
        patients = int(keys["report/patients"]) if "report/patients" in keys else "–"
        if keys.get("report/patients_named") == 0.0:
            patients = f"{patients} (images)"
        task = task_of(keys)
        first = _task_cell(keys, task) if task else _ci(keys, "report/acc")
        cells = [row["recipe"], str(folds), str(patients), first, _ci(keys, "report/case_acc"),
                 _ci(keys, "report/balanced_acc"), _ci(keys, "report/f1_macro"), _ci(keys, "report/colour_acc"),
                 _over_folds(row), row["folder"]]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Pooled over folds, 95% intervals over patients (bootstrap; exact over cases where every resample "
             "scores alike); case-level: the majority of a case's images; colour only: the stronger colour-only "
             "baseline on the same folds; over folds: mean ± sd. A survival or regression sweep: its own figures "
             "(C-index; MAE and R²) in the accuracy column, with their intervals over patients."]
    return "\n".join(lines + notes) + "\n"
