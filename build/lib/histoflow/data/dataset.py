"""A prepared data set on disk: manifest, fold-aligned shards, per-fold training means."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.data.manifest import read_manifest

RECORD = "dataset.json"  # the completion record, written last


@dataclass
class Split:
    """The shards of one training run: fit on `train`, select on `val`, report on `test`."""

    train: list[str]
    val: list[str]
    test: list[str]
    samples: dict[str, int]


class PreparedDataset:
    """Read access to what prepare wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        record = self.path / RECORD
        if not record.is_file():
            raise MissingInputError(f"{record}: no completion record; the data set was not (fully) prepared. "
                                    "Fix: run `histoflow prepare data=...` (it resumes where it stopped)")
        self.record = json.loads(record.read_text())
        self.classes: list[str] = self.record["classes"]
        self.root = Path(self.record["root"])
        self.patch_side: int = self.record["patch_side"]
        self.test_folds: list[str] = self.record["test_folds"]

    @property
    def stain(self) -> dict | None:
        """The fitted stain normalisation every image went through before its patches were cut (None: off)."""
        return self.record["settings"].get("stain")  # in the settings that key the folder, absent when off

    def manifest(self) -> list[dict]:
        return read_manifest(self.path / "manifest.csv")

    def _check(self, test_fold: str) -> str:
        test_fold = str(test_fold)
        if test_fold not in self.test_folds:
            raise ConfigError(f"fold={test_fold!r} is not a fold of {self.path}: choose one of {self.test_folds}")
        return test_fold

    def split(self, test_fold: str | int) -> Split:
        """Shards for holding out `test_fold`: its shards test; flagged images of the rest validate."""
        test_fold = self._check(test_fold)
        parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        samples = {"train": 0, "val": 0, "test": 0}
        for s in self.record["shards"]:
            role = "test" if s["fold"] == test_fold else "val" if s["part"] == "val" else "train"
            parts[role].append(str(self.path / "shards" / s["file"]))
            samples[role] += s["samples"]
        return Split(parts["train"], parts["val"], parts["test"], samples)

    def stats(self, test_fold: str | int) -> dict[str, np.ndarray]:
        """Training mean image (s, s, 3), channel mean and std (3,), in 0-255 units, for this held-out fold."""
        test_fold = self._check(test_fold)
        with np.load(self.path / "stats" / f"fold-{test_fold}.npz") as z:
            return {k: z[k] for k in z.files}
