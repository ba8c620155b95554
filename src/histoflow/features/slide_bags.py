"""Slide and patient bags from a slide table: the DataModule of `data=slides` (conf/data/slides.yaml).

    histoflow train -m data=slides data.table=cohort.csv encoder=mobilenet_v2_imagenet model=abmil \
        bag.level=patient fold=1,2,3,4,5

`prepare_data` embeds the table's slides once through the frozen encoder (features/cohort.py: tissue mask,
micron-true tiles as conf/slide tiles them, one slide feature file per slide keyed by the slide's bytes; a rerun or
another fold finds them);
`setup` assigns the slides to folds by patient (stratified by label, `data.split`, so that no patient is on both
sides of any split) and reads one bag per slide (`bag.level=slide`) or per patient, a patient's slides pooled
(`bag.level=patient`). A slide that gives no tile (no tissue, unreadable, no microns per pixel) is listed in the
cohort's problems table and in each run's problems.csv and left out (`data.on_bad_image=skip`, the default here),
never an empty bag.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.data.datamodule import ROLES
from histoflow.data.folds import SplitConfig
from histoflow.data.problems import Problem
from histoflow.features.bag_targets import attach_targets, stratified_by, table_targets, task_folds, task_of
from histoflow.features.bags import Bag, BagLoaders, check_one_side, cohort_bags, patient_bags
from histoflow.features.cohort import embed_cohort, prepare_job
from histoflow.slides.table import SlideRecord, check_classes, read_slide_table, slide_folds

log = logging.getLogger(__name__)


class SlideBagDataModule(BagLoaders, pl.LightningDataModule):
    """Bags of one held-out fold of a slide table's slides, embedded once by a frozen encoder.

    table: the slide table (slide,patient,label[,...]); classes: their order (null: the table's labels, sorted);
    split: data.split (k folds by patient); slide: how slides are tiled (embed.yaml's `slide` keys); features: where
    the shards go and on which devices (embed.yaml's `embed` keys); on_bad_image: skip | error. `embed` (from
    train.py): the frozen encoder (features.embeddings.Embedder); `bag`: train.yaml's bag section."""

    levels = ("slide", "patient")

    def __init__(self, fold: int | str = 1, preprocess: Mapping[str, Any] | None = None, embed: Any = None,
                 bag: Mapping[str, Any] | None = None, table: str | None = None,
                 classes: Sequence[str] | None = None, split: Mapping[str, Any] | None = None,
                 slide: Mapping[str, Any] | None = None, features: Mapping[str, Any] | None = None,
                 on_bad_image: str = "skip", name: str = "slides", task: Mapping[str, Any] | None = None,
                 **unused: Any) -> None:
        super().__init__()
        self.task = task_of(task)  # classification, or task=survival|regression: targets from task.table or the table
        self.stratified_by = stratified_by(self.task)  # what the folds are stratified by (the task report says it)
        if not table:
            raise ConfigError("data=slides needs a slide table. Fix: data.table=<cohort.csv> (columns slide, patient, "
                              "label; docs/cohorts.md)")
        self._read_bag_section(bag)
        self.fold, self.name, self.table = str(fold), name, Path(table)
        if self.task.name == "classification":  # one class: refused before any slide is embedded
            check_classes(read_slide_table(self.table), self.table)
        self.split_cfg = SplitConfig.from_config(split)
        self.slide_cfg, self.run_cfg = to_builtin(slide or {}), {**to_builtin(features or {}), "chunk": None}
        self.on_bad_image, self.wanted_classes = on_bad_image, list(classes) if classes else None
        if embed is None:
            raise ConfigError("slide bags are made of a frozen encoder's features. Fix: add encoder=<name> "
                              "(conf/encoder), e.g. encoder=mobilenet_v2_imagenet")
        self.encoder = to_builtin(embed.encoder)
        self.input_size: int | None = None
        self.feature_dim: int | None = None
        self.index: Path | None = None
        self.cohort_settings: dict[str, Any] = {}
        self.rows: list[dict[str, str]] = []

    def _arguments(self) -> tuple:
        return self.table, self.encoder, self.slide_cfg, self.run_cfg, self.on_bad_image

    def prepare_data(self) -> None:
        """Embed the table's slides that have no shard yet (all of them the first time; none on later folds)."""
        self.index = embed_cohort(*self._arguments()).index

    def setup(self, stage: str | None = None) -> None:
        if self.bags:
            return
        job = prepare_job(*self._arguments())
        self.cohort_settings = job.settings  # what keys the features: the checkpoint keeps it (state_dict)
        self.index = job.folder / f"{job.name}.index.csv"
        if not self.index.is_file():
            raise MissingInputError(f"{self.index}: no cohort index; the slides were not (all) embedded. Fix: run "
                                    f"`histoflow embed slides={self.table} encoder=...` with this run's slide and "
                                    "encoder settings, or train again (it embeds what is missing)")
        records = read_slide_table(self.table, labelled=self.task.name == "classification")  # a target: no label
        self.classes = self.wanted_classes or sorted({r.label for r in records})
        self.num_classes = len(self.classes)
        # the index's sha256 of each slide: two files of identical bytes under two patients are drawn as one
        shas = {row["slide"]: row["sha256"] for row in _rows(self.index)}
        targets = table_targets(self.task, self.table)
        folds, val = (slide_folds(records, self.split_cfg, shas, self.table) if self.task.name == "classification"
                      else task_folds(records, self.split_cfg, self.task, targets))
        fold_of = {r.slide: f for r, f in zip(records, folds)}
        role_of = {r.slide: "test" if f == self.fold else "val" if v else "train"
                   for r, f, v in zip(records, folds, val)}
        if self.fold not in set(folds):
            raise ConfigError(f"fold={self.fold}: the slide table's folds are {sorted(set(folds))} (data.split)")
        slides, self.problems = cohort_bags(self.index, self.classes, "slide", fold_of)
        self.problems += _problems_table(job.folder / f"{job.name}.problems.csv")
        file_of = {r.slide: str(r.path) for r in records}
        self._sources = {str(k): {"path": file_of[row["slide"]], "shard": str(self.index.parent / row["shard"])}
                         for k, row in enumerate(_rows(self.index))}
        for role in ROLES:
            members, untargeted = attach_targets([b for b in slides if role_of[b.name] == role], targets, self.task)
            self.problems += untargeted
            self.bags[role] = patient_bags(members, self.classes) if self.level == "patient" else members
        if self.level == "patient":
            check_one_side(self.bags, self.fold)
        self.feature_dim = int(slides[0].features.shape[1]) if slides else None
        self._say_problems("slide(s)")
        self._say_absent_classes(slides, records)
        if not self.bags["train"] and stage in (None, "fit"):
            raise ConfigError(f"fold {self.fold} of {self.table} leaves no training bag. Fix: more slides or fewer "
                              "folds (data.split.k)")

    def _say_absent_classes(self, slides: Sequence[Bag], records: Sequence[SlideRecord]) -> None:
        """A class whose every slide was left out: the head keeps it, and no figure says so unless this does."""
        kept = {b.label for b in slides}
        why = {p.path: p.kind for p in self.problems}
        for k, name in enumerate(self.classes):
            if k not in kept:
                left = [f"{r.slide} ({why.get(r.slide, 'no bag')})" for r in records if r.label == name]
                log.warning("class %r: every slide of it was left out (%s): the head keeps the class, but no bag of "
                            "it is trained or tested. Fix: check those slides (problems.csv), or remove the class's "
                            "rows from %s", name, ", ".join(left) or "none in the table", self.table)

    def tile_sources(self, bags: Sequence[Bag]) -> dict[str, dict[str, Any]]:
        indices = sorted({str(int(i)) for b in bags for i in np.unique(b.coords[:, 0])})
        return {i: self._sources[i] for i in indices}

    def state_dict(self) -> dict[str, Any]:
        if not self.bags:
            return {}
        return {"classes": list(self.classes), "fold": self.fold, "bag": {"level": self.level},
                "encoder": {"dim": self.feature_dim, "index": str(self.index)},
                # the encoder (config, weights' sha256, input) and tiling the bags were made with: `histoflow predict
                # slides=...` embeds new slides alike and refuses a command line that would change them
                "cohort": self.cohort_settings}


def _rows(index: Path) -> list[dict[str, str]]:
    with index.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _problems_table(path: Path) -> list[Problem]:
    """The slides the cohort's embedding left out (unreadable, no tissue, no microns per pixel), with the reason."""
    if not path.is_file():
        return []
    return [Problem(r["path"], r["kind"], r["detail"]) for r in _rows(path)]

