"""Bad inputs, found while preparing data or predicting: collected, reported all at once, each with its fix, and
listed in problems.csv (one format for both)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from histoflow.common.errors import HistoflowError

# One fix per kind of problem, so every error tells the user what to do next.
FIXES = {
    "corrupt": "re-export or re-download the file, or remove it",
    "not-an-image": "remove the file from the data folder",
    "too-small": "remove the image or lower data.patches.size",
    "empty-class": "add images to the folder, remove it, or list the wanted classes in data.classes",
    "unknown-class": "add the class to data.classes or remove the file",
    "no-label": "rename the file so data.label_regex matches it, or use data.labels=folder",
    "conflicting-labels": "one image with two labels (two class folders, or a table that disagrees): keep one",
    "no-group": "list the image in the data.groups table, or rename the file so data.group_regex matches it",
    "missing": "fix the path in the CSV or add the file",
}

SKIP_HINT = "or set data.on_bad_image=skip to leave these files out (they are then listed in problems.csv)"


@dataclass(frozen=True)
class Problem:
    """One bad input: which file, what kind of problem, and the details."""

    path: str
    kind: str
    detail: str = ""


class BadInputError(HistoflowError, ValueError):
    """Raised with every offending file, grouped by kind of problem, and the fix for each kind."""

    def __init__(self, problems: list[Problem], where: str):
        self.problems = problems
        lines = [f"{len(problems)} bad input(s) in {where}:"]
        for kind in sorted({p.kind for p in problems}):
            lines.append(f"  {kind} (fix: {FIXES.get(kind, 'see the detail')}):")
            lines += [f"    {p.path}" + (f": {p.detail}" if p.detail else "") for p in problems if p.kind == kind]
        lines.append(f"  {SKIP_HINT}")
        super().__init__("\n".join(lines))


COLUMNS = ["path", "kind", "detail", "action"]  # of problems.csv


def write_problems(path: Path, **by_action: Iterable[Problem]) -> Path:
    """problems.csv: each problem (path, kind, detail) with what was done about it, the keyword it is passed under:
    skipped or stopped (a bad input), kept (an image converted, e.g. to 8-bit RGB). A header alone: nothing wrong."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([p.path, p.kind, p.detail, action] for action, problems in by_action.items() for p in problems)
    return path
