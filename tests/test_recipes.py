"""`histoflow summary <multirun> <multirun> ...`: recipes side by side from their reports' keys (issue 42)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from histoflow.common.errors import MissingInputError
from histoflow.inference.recipes import comparison_table, sweep_row

REPO = Path(__file__).resolve().parents[1]


def fake_sweep(root: Path, name: str, acc: float, low: float, high: float, report: bool = True) -> Path:
    """A finished multirun as the report and summary leave it: two jobs' saved configs (name unresolved where it
    interpolates, as Hydra saves it), summary.json with the folds' test accuracy, image_report/report.json keys."""
    sweep = root / name
    for job, fold in (("0", 1), ("1", 2)):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "config.yaml").write_text(f"name: {name}\nfold: {fold}\n")
    folds = {"test/acc_macro": {"mean": 0.5, "sd": 0.1, "n": 2.0}}
    (sweep / "summary.json").write_text(json.dumps({"summary": folds, "per_fold": {}}))
    if report:
        keys = {"report/acc": acc, "report/acc_low": low, "report/acc_high": high, "report/case_acc": 0.75,
                "report/case_acc_low": 0.25, "report/case_acc_high": 1.0, "report/balanced_acc": acc,
                "report/f1_macro": acc, "report/colour_acc": 0.4, "report/patients": 8.0,
                "report/patients_named": 1.0, "report/acc_mean": acc, "report/acc_sd": 0.05, "report/folds": 2.0}
        (sweep / "image_report").mkdir()
        (sweep / "image_report" / "report.json").write_text(json.dumps({"keys": keys}))
    return sweep


def cells(table: str, recipe: str) -> list[str]:
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {recipe} |")]
    return [c.strip() for c in row.strip("|").split("|")]


def test_two_recipes_one_table_with_their_intervals(tmp_path: Path) -> None:
    a = fake_sweep(tmp_path, "recipe-a", 0.875, 0.62, 1.0)
    b = fake_sweep(tmp_path, "recipe-b", 0.5, 0.25, 0.75)
    table = comparison_table([sweep_row(a), sweep_row(b)])
    assert table.index("| recipe-a |") < table.index("| recipe-b |")  # in the order given
    assert cells(table, "recipe-a")[:5] == ["recipe-a", "2", "8", "0.875 [0.62, 1.00]", "0.750 [0.25, 1.00]"]
    assert cells(table, "recipe-b")[3] == "0.500 [0.25, 0.75]"
    assert cells(table, "recipe-b")[8] == "0.500 ± 0.050" and cells(table, "recipe-b")[9] == str(b)
    # the command prints the same table, and reads the folders only
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    shown = subprocess.run([sys.executable, "-m", "histoflow", "summary", str(a), str(b)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == table
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_sweep_without_report_shows_its_folds_and_a_folder_of_nothing_is_refused(tmp_path: Path) -> None:
    bare = fake_sweep(tmp_path, "no-report", 0, 0, 0, report=False)
    row = cells(comparison_table([sweep_row(bare)]), "no-report")
    assert row[3] == "–" and row[8] == "0.500 ± 0.100 (patches)"
    with pytest.raises(MissingInputError, match="not a finished multirun"):
        sweep_row(tmp_path / "elsewhere")


def test_survival_and_regression_sweeps_show_their_own_figures(tmp_path: Path) -> None:
    """A task sweep's report has no accuracy: its C-index (survival) or MAE and R² (regression) with their intervals
    take the first metric's column, named; the classification columns say nothing rather than a wrong figure."""
    survival = fake_sweep(tmp_path, "cox", 0, 0, 0, report=False)
    (survival / "image_report").mkdir()
    keys = {"report/cindex": 0.712, "report/cindex_low": 0.6, "report/cindex_high": 0.81, "report/logrank_p": 0.03,
            "report/cindex_mean": 0.7, "report/cindex_sd": 0.05, "report/patients": 40.0, "report/folds": 5.0}
    (survival / "image_report" / "report.json").write_text(json.dumps({"task": "survival", "keys": keys}))
    regression = fake_sweep(tmp_path, "l1", 0, 0, 0, report=False)
    (regression / "image_report").mkdir()
    interval = {"mae": [1.0, 1.5], "r2": [0.1, 0.5], "pearson_r": [0.3, 0.7]}  # an older report: keys computed
    (regression / "image_report" / "report.json").write_text(json.dumps({
        "task": "regression", "n": 30, "patients": 30, "per_fold": {"1": {}, "2": {}},
        "pooled": {"mae": 1.25, "r2": 0.3, "pearson_r": 0.55, "interval": interval},
        "summary": {m: {"mean": 1.2 if m == "mae" else 0.3, "sd": 0.1} for m in interval}}))
    table = comparison_table([sweep_row(survival), sweep_row(regression)])
    cox, l1 = cells(table, "cox"), cells(table, "l1")
    assert cox[1:4] == ["5", "40", "C-index 0.712 [0.60, 0.81] (survival)"]
    assert cox[4:8] == ["–"] * 4 and cox[8] == "0.700 ± 0.050 (C-index)"
    assert l1[1:4] == ["2", "30", "MAE 1.250 [1.00, 1.50]; R² 0.300 [0.10, 0.50] (regression)"]
    assert l1[8] == "1.200 ± 0.100 (MAE)"
