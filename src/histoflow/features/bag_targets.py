"""A task's targets on bags (task=survival|regression, data/targets.py): each image or slide bag gets its patient's,
slide's or image's target before a patient's bags are pooled; folds of a slide table stratified by the target.

A bag whose key has no row in the target table is listed as a problem (`no-target`) and left out, never trained on
with a made-up target; a patient whose images or slides disagree on the target is an error naming the patient
(features/bags.patient_bags, and the table's own check). Folds of a task, of a slide table (task_folds) or of
prepared images (image_task_folds), are drawn by patient and stratified by the event or the target's quantile bin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from histoflow.common.errors import ConfigError
from histoflow.data.folds import SplitConfig, assign_folds
from histoflow.data.problems import Problem
from histoflow.data.targets import TaskConfig, read_targets, strata


def task_of(task: Mapping[str, Any] | TaskConfig | None) -> TaskConfig:
    """The task section read (classification where none is given)."""
    return task if isinstance(task, TaskConfig) else TaskConfig.from_config(task)


def table_targets(task: TaskConfig, slide_table: str | Path | None = None) -> dict:
    """The task's targets by key: from task.table, else (data=slides) from the slide table; {} for classification."""
    if task.name == "classification":
        return {}
    table = task.table or slide_table
    if not table:
        raise ConfigError(f"task={task.name} needs a table of targets ({', '.join(task.columns)} by {task.key}). "
                          "Fix: task.table=<targets.csv> (docs/survival.md)")
    return read_targets(table, task)


def bag_key(bag: Any, task: TaskConfig) -> str:
    """Whose target a bag takes: its patient's (task.key=patient), else its own (an image's or slide's name)."""
    return str(bag.group) if task.key == "patient" else str(bag.name)


def attach_targets(bags: Sequence[Any], targets: Mapping[str, Any],
                   task: TaskConfig) -> tuple[list[Any], list[Problem]]:
    """The bags with a target (bag.target set), and a problem for each bag without one (left out)."""
    if task.name == "classification":
        return list(bags), []
    kept, problems = [], []
    for bag in bags:
        target = targets.get(bag_key(bag, task))
        if target is None:
            problems.append(Problem(str(bag.name), "no-target", f"no row of {task.key} {bag_key(bag, task)} in the "
                                    f"target table ({task.table or 'the slide table'}): left out"))
            continue
        bag.target = target
        kept.append(bag)
    return kept, problems


def task_folds(records: Sequence[Any], cfg: SplitConfig, task: TaskConfig,
               targets: Mapping[str, Any]) -> tuple[list[str], list[bool]]:
    """Each slide's fold and validation flag, drawn by patient and stratified by the event (survival) or the
    target's quantile bin (regression) instead of the label."""
    keys = [r.patient if task.key == "patient" else r.slide for r in records]
    return assign_folds(strata([targets.get(k) for k in keys], task), [r.patient for r in records], cfg)


def image_task_folds(manifest: Sequence[Mapping[str, Any]], cfg: SplitConfig, task: TaskConfig,
                     targets: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The prepared manifest's rows with their fold and validation flag drawn again for a task (image bags): by the
    manifest's group (each image's patient or case, identical images joined), stratified by the event or the
    target's quantile bin instead of the class; deterministic for data.split.seed, so every fold job of a multirun
    gives an image the same fold. Rows are copies; the manifest is left as it is."""
    groups = [str(r.get("group") or r["image"]) for r in manifest]
    keys = groups if task.key == "patient" else [str(r["image"]) for r in manifest]
    folds, val = assign_folds(strata([targets.get(k) for k in keys], task), groups, cfg, ("patients", "images"))
    return [{**r, "fold": f, "val": v} for r, f, v in zip(manifest, folds, val)]


def stratified_by(task: TaskConfig) -> str:
    """What a task's folds are stratified by, in words (the report says it)."""
    return "class" if task.name == "classification" else "event" if task.name == "survival" else \
        f"target's quantile bin (task.bins={task.bins})"
