"""Targets beyond classes: a time to an event (survival) or a number (regression) per patient, slide or image.

The `task` section of train.yaml (conf/task/: classification | regression | survival) says what a bag head learns
and where its targets come from: a CSV (`task.table`; null: the slide table of data=slides) whose `task.key` column
names whose target a row holds (patient, slide or image), with

    survival     `task.time` (a number >= 0, in any unit) and `task.event` (1: the event, 0: censored then)
    regression   `task.target` (a number)

Every bad row is reported at once, numbered as a spreadsheet numbers it (the header is row 1): a missing or negative
time, an event other than 0/1, a target that is not a number. Two rows of one key (a patient's slides) that
disagree on the target are an error naming the key. Folds of a task are stratified by `strata`: the event
(survival) or the target's quantile bin (regression), drawn by patient as always.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from histoflow.common.config import read_section
from histoflow.common.errors import ConfigError, HistoflowError, MissingInputError

TASKS = ("classification", "regression", "survival")
LOSSES = {"survival": ("cox", "nll"), "regression": ("l1", "mse"), "classification": ("cross_entropy",)}
SHOWN = 20  # bad rows listed in the error; the rest are counted


class TargetTableError(HistoflowError, ValueError):
    """A target table that cannot be used; the message names the CSV, each row at fault and the fix."""


@dataclass
class TaskConfig:
    """What a bag head learns (train.yaml's `task`, conf/task/*.yaml)."""

    name: str = "classification"  # classification | regression | survival
    table: str | None = None  # CSV of the targets; null: the slide table (data=slides)
    key: str = "patient"  # the table's column naming whose target a row is: patient | slide | image
    time: str = "time"  # survival: the column of the time to the event or to censoring
    event: str = "event"  # survival: the column of the event indicator (1 event, 0 censored)
    target: str = "target"  # regression: the column of the number
    loss: str = "cross_entropy"  # survival: cox | nll; regression: l1 | mse
    bins: int = 4  # survival nll: time bins (quantiles of the training event times); regression: folds' strata

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "TaskConfig":
        return read_section(cls, cfg, "task")

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ConfigError(f"task.name={self.name!r}: expected one of {', '.join(TASKS)} (task=<name>)")
        if self.loss not in LOSSES[self.name]:
            raise ConfigError(f"task.loss={self.loss!r} for task {self.name}: expected one of "
                              f"{', '.join(LOSSES[self.name])}")
        if self.bins < 2:
            raise ConfigError(f"task.bins={self.bins}: at least 2")

    @property
    def columns(self) -> tuple[str, ...]:
        """The target's columns, in the order of a bag's target vector."""
        return (self.time, self.event) if self.name == "survival" else (self.target,)

    @property
    def outputs(self) -> int:
        """The head's outputs: one risk (Cox) or value (regression), a hazard logit per time bin (nll)."""
        return self.bins if self.loss == "nll" else 1


def _fields(task: TaskConfig) -> tuple[str, ...]:
    """The task section's keys that name the target's columns."""
    return ("time", "event") if task.name == "survival" else ("target",)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _row_problems(values: Mapping[str, str], task: TaskConfig) -> list[str]:
    """What is wrong with one row's target cells."""
    if task.name == "regression":
        return [] if _number(values[task.target]) is not None else \
            [f"{task.target} {values[task.target]!r} is not a number"]
    problems = []
    time = _number(values[task.time])
    if time is None or time < 0:
        said = "missing" if not values[task.time] else f"{values[task.time]!r}"
        problems.append(f"{task.time} {said}: a time >= 0 is needed")
    if values[task.event] not in ("0", "1", "0.0", "1.0"):
        problems.append(f"{task.event} {values[task.event]!r}: 1 (the event) or 0 (censored)")
    return problems


def read_targets(path: str | Path, task: TaskConfig) -> dict[str, np.ndarray]:
    """Each key's target vector (float64: (time, event) or (target,)) from a CSV; TargetTableError lists every bad
    row by its number and every key whose rows disagree."""
    table = Path(path).expanduser()
    if not table.is_file():
        raise MissingInputError(f"{path}: no target table there (task.table). Fix: check the path")
    with open(table, newline="", encoding="utf-8-sig") as handle:
        rows = [[cell.strip() for cell in cells] for cells in csv.reader(handle)]
    header = rows[0] if rows else []
    missing = [c for c in (task.key, *task.columns) if c not in header]
    if missing:
        raise TargetTableError(f"{table}: no column {', '.join(map(repr, missing))} for task {task.name} (found: "
                               f"{', '.join(map(repr, header)) or 'nothing'}). Fix: name the table's columns in "
                               f"task.key and task.{' and task.'.join(_fields(task))}")
    problems: list[str] = []
    targets: dict[str, np.ndarray] = {}
    rows_of: dict[str, list[int]] = {}
    disagree: set[str] = set()
    for number, cells in enumerate(rows[1:], start=2):
        if not any(cells):
            continue
        values = dict(zip(header, cells + [""] * (len(header) - len(cells))))
        key = values[task.key]
        said = _row_problems(values, task) + ([] if key else [f"{task.key} empty"])
        if said:
            problems.append(f"row {number}: {'; '.join(said)}")
            continue
        vector = np.array([float(values[c]) for c in task.columns])
        rows_of.setdefault(key, []).append(number)
        if key in targets and not np.array_equal(targets[key], vector):
            disagree.add(key)
        targets.setdefault(key, vector)
    for key in sorted(disagree):
        problems.append(f"{task.key} {key}: rows {', '.join(map(str, rows_of[key]))} disagree on the target "
                        f"({', '.join(task.columns)}). Fix: give every row of {task.key} {key} the same target")
    if not problems and not targets:
        problems.append("no rows below the header. Fix: add a row per " + task.key)
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise TargetTableError(f"{table}: {len(problems)} problem(s) with the task's targets (rows as a spreadsheet "
                               "numbers them, the header is row 1):\n" + "\n".join(f"  {p}" for p in problems[:SHOWN])
                               + more)
    return targets


def strata(targets: Sequence[np.ndarray | None], task: TaskConfig) -> list[str]:
    """What folds of a task are stratified by, per item: the event (survival), the target's quantile bin of
    task.bins (regression); "none" where an item has no target."""
    if task.name == "survival":
        return [f"event {int(t[1])}" if t is not None else "none" for t in targets]
    known = np.array([t[0] for t in targets if t is not None])
    edges = np.quantile(known, np.linspace(0, 1, task.bins + 1)[1:-1]) if len(known) else np.array([])
    return [f"bin {int(np.searchsorted(edges, t[0], side='right'))}" if t is not None else "none" for t in targets]
