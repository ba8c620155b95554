"""A k-fold report where a class has no row (issue 37, item 16): every slide of it was left out, the head keeps the
class; the headline and report.md say so, and the Left out bullets name each slide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histoflow.data.problems import Problem
from histoflow.inference.image_report import fold_report
from histoflow.inference.sweep_report import headline

CLASSES = ["A", "B", "C"]


def _rows(tmp_path: Path) -> list[dict[str, Any]]:
    """8 slides of classes A and B (none of C) in 4 folds, all right."""
    rows, rng = [], np.random.default_rng(0)
    for g in range(8):
        label = CLASSES[g % 2]
        path = tmp_path / f"{label}-{g}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        p = {c: 0.8 if c == label else 0.1 for c in CLASSES}
        rows.append({"image": str(path), "fold": str(g % 4 + 1), "label": label, "predicted": label, "patches": 4,
                     **{f"votes_{c}": 4 * (c == label) for c in CLASSES}, **{f"prob_{c}": p[c] for c in CLASSES},
                     "group": f"P{g}"})
    return rows


def test_a_class_without_a_row_is_named_in_the_headline_and_the_report(tmp_path: Path) -> None:
    problems = [Problem("scans/c1.tif", "no-tissue", "no tissue found at slide.min_tissue=0.5"),
                Problem("scans/c2.tif", "unreadable", "not a slide")]
    report = fold_report(_rows(tmp_path), CLASSES, tmp_path, {"aggregate": "vote", "bag_level": "slide"},
                         problems=problems, colour=False)
    assert report["absent_classes"] == ["C"]
    line = headline(report)
    assert "WARNING: no slide of class 'C' in this report (every one left out" in line
    text = (tmp_path / "report.md").read_text()
    assert "**Warning**: no slide of class 'C'" in text.split("## Per fold")[0]  # at the top, not below the tables
    assert "- `scans/c1.tif` (no-tissue): no tissue found at slide.min_tissue=0.5" in text
    assert "- `scans/c2.tif` (unreadable): not a slide" in text


def test_a_report_with_every_class_has_no_warning(tmp_path: Path) -> None:
    report = fold_report(_rows(tmp_path), CLASSES[:2], tmp_path, {"aggregate": "vote", "bag_level": "slide"},
                         colour=False)
    assert report["absent_classes"] == [] and "WARNING" not in headline(report)
    assert "**Warning**" not in (tmp_path / "report.md").read_text()
