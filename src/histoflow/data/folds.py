"""Patient-level folds: assign every image's group to one fold, save the split, check it for leaks.

Three kinds of split, all grouped (and stratified by class where there is a choice):
- `kfold` (scikit-learn's StratifiedGroupKFold): folds "1".."k"; within each fold a grouped `val_fraction` is
  flagged for validation, so training on the other folds can validate on their flagged images without touching
  the test fold.
- `leave_one_group_out`: every group (patient) is its own fold, "1".."number of groups" in sorted group order, so
  each training run sees all patients but one.
- `fractions`: folds "train", "val", "test" (e.g. 0.4/0.2/0.4, the tissue-tile use case): each class's
  groups are cut at the cumulative fractions, so even three tiles per class split 1/1/1.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from histoflow.common.config import at_least, read_section
from histoflow.common.errors import ConfigError, HistoflowError


@dataclass
class SplitConfig:
    """How images are split into folds."""

    kind: str = "kfold"  # kfold | leave_one_group_out | fractions
    k: int = 5
    val_fraction: float = 0.1  # kfold: share of each fold's groups held out for validation
    val_groups_per_class: int = 0  # kfold, > 0 instead of val_fraction: this many groups of every class, each
    #                                 in another fold, so that every run (k-1 folds) validates on every class
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.4, "val": 0.2, "test": 0.4})
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "SplitConfig":
        return read_section(cls, cfg, "data.split")

    def __post_init__(self) -> None:
        """Values checked before any folder is made (k=1 once failed inside scikit-learn, leaving a half-written
        prepared folder)."""
        if self.kind not in ("kfold", "leave_one_group_out", "fractions"):
            raise ConfigError(f"data.split.kind={self.kind!r}: expected kfold, leave_one_group_out or fractions")
        if self.kind == "kfold":
            at_least(self.k, 2, "data.split.k")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.split.val_fraction={self.val_fraction}: a share from 0 (none) to below 1")
        at_least(self.val_groups_per_class, 0, "data.split.val_groups_per_class")
        if self.kind == "fractions":
            negative = {k: v for k, v in self.fractions.items() if v < 0}
            total = sum(self.fractions.values())
            if negative or abs(total - 1.0) > 1e-6:
                raise ConfigError(f"data.split.fractions={dict(self.fractions)}: shares of at least 0 adding up to 1 "
                                  f"(they add up to {total:g})")

    def test_folds(self, rows: list[dict] | None = None) -> list[str]:
        """The folds a training run may hold out as its test set (the `fold` option of train.py); leave one group
        out has the folds of the manifest `rows`, one per group."""
        if self.kind == "leave_one_group_out":
            return sorted({str(r["fold"]) for r in rows or ()}, key=int)
        return [str(i) for i in range(1, self.k + 1)] if self.kind == "kfold" else ["test"]


class LeakageError(HistoflowError, ValueError):
    """One patient or one identical image is on both sides of a split."""


def _grouped_folds(labels: np.ndarray, groups: np.ndarray, n: int, seed: int, what: str,
                   words: tuple[str, str] = ("groups", "images")) -> np.ndarray:
    """Fold index 0..n-1 of every item; every group lands in exactly one fold. words: what the groups and the items
    are called in the error (patients and slides for a slide table)."""
    n_groups = len(np.unique(groups))
    if n_groups < n:
        raise ConfigError(f"{what}: {n_groups} {words[0]} cannot fill {n} folds. Fix: add {words[1]} of more "
                          f"{words[0]}, lower data.split.k, or use coarser fractions")
    from sklearn.model_selection import (
        StratifiedGroupKFold,  # 1.4 s of imports: only where folds are drawn
    )

    fold = np.empty(len(labels), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    try:
        for i, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            fold[test] = i
    except ValueError as e:
        raise ConfigError(f"{what}: cannot make {n} stratified folds ({e}). Fix: add images or use fewer folds") from e
    return fold


def _fraction_split(labels: np.ndarray, groups: np.ndarray, fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Split name of every item: each class's groups, in seeded random order, cut at the cumulative fractions."""
    total = sum(fractions.values())
    if not np.isclose(total, 1):
        raise ConfigError(f"data.split.fractions {dict(fractions)} must add up to 1 (they add up to {total})")
    names, cumulative = list(fractions), np.cumsum(list(fractions.values()))
    group_ids, inverse = np.unique(groups, return_inverse=True)
    # a group's class is its most common one (patients normally have one)
    group_label = np.array([Counter(labels[inverse == i]).most_common(1)[0][0] for i in range(len(group_ids))])
    rng = np.random.default_rng(seed)
    split_of_group = np.empty(len(group_ids), dtype=object)
    for label in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == label))
        bounds = np.round(cumulative * len(members)).astype(int)
        split_of_group[members] = [names[np.searchsorted(bounds, i, side="right")] for i in range(len(members))]
    return split_of_group[inverse].astype(str)


def _class_aware_validation(labels: np.ndarray, groups: np.ndarray, fold: np.ndarray, per_class: int,
                            seed: int) -> np.ndarray:
    """Validation flags: for every class, one random group of it in each of `per_class` random folds holding it.

    A run that holds out one fold still validates on per_class - 1 groups of every class, which a share of each
    fold (val_fraction) cannot promise when a fold holds only a few groups.
    """
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        of_class = labels == label
        folds = np.unique(fold[of_class])
        for f in rng.permutation(folds)[:per_class]:
            candidates = np.unique(groups[of_class & (fold == f)])
            val[groups == rng.choice(candidates)] = True
    return val


def assign_folds(labels: list[str], groups: list[str], cfg: SplitConfig,
                 words: tuple[str, str] = ("groups", "images")) -> tuple[list[str], list[bool]]:
    """Fold name and validation flag of every image, grouped and stratified, deterministic for the seed; words: what
    the groups and items are called in errors."""
    y, g = np.asarray(labels), np.asarray(groups)
    val = np.zeros(len(y), dtype=bool)
    if cfg.kind in ("kfold", "leave_one_group_out"):
        if cfg.kind == "kfold":
            idx = _grouped_folds(y, g, cfg.k, cfg.seed, "data.split.k", words)
        else:
            idx = np.unique(g, return_inverse=True)[1]
        names = np.array([str(i + 1) for i in idx])
        if cfg.val_groups_per_class > 0:
            val = _class_aware_validation(y, g, idx, cfg.val_groups_per_class, cfg.seed + 1)
        elif cfg.val_fraction > 0:
            n_val = max(2, round(1 / cfg.val_fraction))
            for f in range(int(idx.max()) + 1):
                members = np.flatnonzero(idx == f)
                largest_class = max(np.unique(y[members], return_counts=True)[1])
                n = min(n_val, len(np.unique(g[members])), largest_class)
                if n >= 2:  # a fold of one group cannot spare one for validation
                    with warnings.catch_warnings():  # small classes per fold are expected here
                        warnings.simplefilter("ignore", UserWarning)
                        sub = _grouped_folds(y[members], g[members], n, cfg.seed + 1 + f, "validation split")
                    val[members[sub == 0]] = True
        return names.tolist(), val.tolist()
    if cfg.kind == "fractions":
        names = _fraction_split(y, g, cfg.fractions, cfg.seed)
        return names.tolist(), (names == "val").tolist()
    raise ConfigError(f"data.split.kind={cfg.kind!r}: expected kfold, leave_one_group_out or fractions")


PER_IMAGE, BLOCKS, CASES, LOCO, NAMED = ("per-image folds", "block folds", "case folds", "leave one case out",
                                          "file-name group folds")


def protocol_of(data: Mapping[str, Any], groups: list[str] | None = None) -> str:
    """What a split measures, from the data config that made it and (where known) its images' groups, the
    manifest's column: case folds where patients come from a table, block folds for index blocks, per-image
    folds where no group joins two images."""
    grouped = data.get("groups") or data.get("labels") == "csv" or data.get("group_regex")
    if not grouped or (groups is not None and len(set(groups)) == len(groups)):
        return PER_IMAGE
    if (data.get("split") or {}).get("kind") == "leave_one_group_out":
        return LOCO
    if data.get("groups") or data.get("labels") == "csv":
        return CASES
    return BLOCKS if data.get("group_block") else NAMED


def validation_gaps(labels: list[str], folds: list[str], val: list[bool]) -> dict[str, list[str]]:
    """Classes absent from the validation set of each held-out fold's training run (only folds with a gap).

    With few groups (slides, patients) a grouped validation share is one or two groups, often of one class;
    model selection on it then favours whatever that class needs.
    """
    classes = sorted(set(labels))
    gaps = {}
    for test in sorted(set(folds)):
        seen = {lab for lab, f, v in zip(labels, folds, val) if v and f != test}
        if seen and len(seen) < len(classes):
            gaps[test] = [c for c in classes if c not in seen]
    return gaps


def check_leakage(rows: list[dict]) -> None:
    """Fail, naming the files, if a group or an identical image (same hash) is in two splits."""
    leaks = []
    for key in ("group", "sha256"):
        where: dict[str, set] = {}
        for r in rows:
            where.setdefault(r[key], set()).add((r["fold"], r["val"]))
        for value, places in where.items():
            if len(places) > 1:
                files = [r["image"] for r in rows if r[key] == value]
                leaks.append(f"  {key} {value[:16]} is in {sorted(places)}: {', '.join(files)}")
    if leaks:
        raise LeakageError("leaky split (the same patient or image on both sides):\n" + "\n".join(leaks)
                           + "\nFix: delete the manifest so it is made again, or correct the groups.")
