"""Every image checked into the manifest: decodable, big enough, not a duplicate of another class; grouped into
folds, with the leak audit of the split."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np

from histoflow.common.errors import ConfigError
from histoflow.common.progress import process_map, progress_bar
from histoflow.data.audit import audit, describe, summary_line, write_report
from histoflow.data.folds import SplitConfig, assign_folds, validation_gaps
from histoflow.data.images import UnreadableImage, read_rgb
from histoflow.data.patches import PatchConfig
from histoflow.data.problems import Problem
from histoflow.data.sources import ImageRecord

log = logging.getLogger(__name__)
MANIFEST_COLUMNS = ["index", "image", "label", "group", "fold", "val", "sha256", "width", "height", "note"]


def _inspect(path: str) -> tuple[int, int, str, np.ndarray] | str:
    """(width, height, note, audit descriptor) of a decodable image, else the reason it is bad."""
    try:
        image, note = read_rgb(path)
    except UnreadableImage as e:
        return str(e).split(": ", 1)[-1]
    return image.shape[1], image.shape[0], note, describe(image)


def _union_identical(records: list[ImageRecord], hashes: list[str]) -> list[str]:
    """Groups with identical images merged, so a duplicate can never cross a split."""
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    first: dict[str, ImageRecord] = {}
    for r, h in zip(records, hashes):
        if h in first and find(first[h].group) != find(r.group):
            log.warning("%s (patient %s) and %s (patient %s) are the same image: their patients are put in one "
                        "group, so the copy cannot cross a split", first[h].path, first[h].group, r.path, r.group)
            parent[find(r.group)] = find(first[h].group)
        first.setdefault(h, r)
    return [find(r.group) for r in records]


def build_manifest(records: list[ImageRecord], hashes: list[str], root: Path, split: SplitConfig,
                   patches: PatchConfig, workers: int) -> tuple[list[dict], list[Problem], list[Problem], np.ndarray]:
    """Decode-check every image (`hashes`: their sha256), then assign folds; returns rows, problems, notes and the
    rows' audit descriptors."""
    problems, notes, good, descriptors = [], [], [], {}
    with progress_bar() as bar:
        task = bar.add_task("checking images", total=len(records), rate="")
        t0 = time.perf_counter()
        checked = process_map(_inspect, [str(root / r.path) for r in records], workers)
        for i, (r, sha, res) in enumerate(zip(records, hashes, checked)):
            bar.update(task, advance=1, rate=f"{(i + 1) / (time.perf_counter() - t0):.0f} images/s")
            if isinstance(res, str):
                problems.append(Problem(str(root / r.path), "corrupt", res))
                continue
            w, h, note, descriptors[r.path] = res
            if patches.size and (h < patches.size or w < patches.size):
                problems.append(Problem(str(root / r.path), "too-small", f"{w}x{h} < patch {patches.size}"))
                continue
            if note:
                notes.append(Problem(str(root / r.path), "note", note))
            good.append((r, sha, w, h, note))
    by_hash: dict[str, set] = {}
    for r, sha, *_ in good:
        by_hash.setdefault(sha, set()).add(r.label)
    clashes = {sha for sha, labels in by_hash.items() if len(labels) > 1}
    problems += [Problem(str(root / r.path), "conflicting-labels", f"same bytes as another image of class "
                         f"{sorted(by_hash[sha] - {r.label})}") for r, sha, *_ in good if sha in clashes]
    good = [g for g in good if g[1] not in clashes]
    if not good:
        return [], problems, notes, np.zeros((0, 0), np.float32)
    groups = _union_identical([g[0] for g in good], [g[1] for g in good])
    labels = [g[0].label for g in good]
    folds, val = assign_folds(labels, groups, split)
    gaps = validation_gaps(labels, folds, val)
    if gaps:  # one warning for all folds (it was one a fold, five near-identical lines on small data)
        log.warning("the grouped validation split lacks a class when holding out %s: selecting the 'best' epoch on "
                    "it is biased. Fix: data.split.val_groups_per_class=2 (every class in every run's validation), "
                    "or data.split.val_fraction=0 callbacks.model_checkpoint.monitor=null (keep the last epoch)",
                    "; ".join(f"fold {fold} (no {' or '.join(missing)} image)" for fold, missing in gaps.items()))
    members: dict[str, set[str]] = {}
    for group, fold in zip(groups, folds):
        members.setdefault(str(fold), set()).add(group)
    lone = sorted(fold for fold, held in members.items() if len(held) == 1)
    if lone and len(members) > 1 and split.kind != "leave_one_group_out":  # there, one group a fold is the design
        log.warning("fold(s) %s hold a single group (patient) each: tested on one patient of one class, such a "
                    "fold's accuracy and macro F1 say little. Fix: fewer folds (data.split.k), or more patients",
                    ", ".join(lone))
    rows = [dict(zip(MANIFEST_COLUMNS, (i, r.path, r.label, grp, f, v, sha, w, h, note)))
            for i, ((r, sha, w, h, note), grp, f, v) in enumerate(zip(good, groups, folds, val))]
    return rows, problems, notes, np.stack([descriptors[r.path] for r, *_ in good])


def warn_if_leaky(descriptors: np.ndarray, rows: list[dict], out: Path) -> None:
    """The leak audit of the new split (seconds): a warning, and audit.md in the prepared folder, when look-alike
    images sit on both sides of the folds."""
    if len({r["fold"] for r in rows}) < 2:
        return
    result = audit(descriptors, [r["fold"] for r in rows], [r["image"] for r in rows])
    report = write_report(result, out, out.name)
    if result.verdict != "leaky":
        return
    groups = {r["group"] for r in rows}
    if groups == {r["image"] for r in rows}:  # every image its own group: no patients were given
        advice = ("Images of one patient or slide are probably on both sides of the folds: give the patients "
                  "(data.groups=<table image,group>, protocol=cases)")
    else:
        advice = (f"The {len(groups)} groups given do not look like patients: look-alike images sit in different "
                  "groups on both sides of the folds, so one patient or slide is probably filed under two groups. "
                  "Check the groups (data.groups, data.group_regex) against the pairs")
    log.warning("%s. %s in %s (histoflow audit data=... shows it again)", summary_line(result), advice,
                report)


def one_class_error(rows: list[dict], classes: list[str], root: Path) -> ConfigError | None:
    present = sorted({r["label"] for r in rows})
    if len(present) > 1:
        return None
    return ConfigError(f"{root}: only one class ({', '.join(present)}) among the usable images, of "
                       f"{', '.join(classes)}: a classifier needs two or more. Fix: point data.root at the folder "
                       "that holds one folder per class, or check data.classes and data.labels")


def write_manifest(rows: list[dict], path: Path) -> None:
    """Save the split, one row per image, atomically."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_manifest(path: str | Path) -> list[dict]:
    """Read a saved split back with typed columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["index"], r["width"], r["height"] = int(r["index"]), int(r["width"]), int(r["height"])
        r["val"] = r["val"] in ("True", "true", "1")
    return rows
