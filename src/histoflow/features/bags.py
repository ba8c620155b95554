"""Bags of frozen tile embeddings: the samples of heads that learn from a label per image or patient (models/mil.py).

A bag is every window embedding of one image (`bag.level=image`) or of every image of one patient
(`bag.level=patient`, the patient from data.groups), read from the cached embeddings of the frozen-feature
workflow (features/embeddings.py), with each tile's coordinates kept beside its features: (image, x, y, rot) in
the prepared image's pixels, the window's side in `Bag.side`. Microns are not known for images without a
resolution (the lymphoma images): `Bag.mpp` is None there. Slide bags (and a patient's slides pooled) come from a
cohort's per-slide feature shards (`cohort_bags`; features/slide_bags.py, data=slides): coords (slide, x, y, 0)
in level-0 pixels, coords_um in microns.

Batches pad bags to the longest with zeros and give a mask (True on real tiles): (features (B, N, D), mask (B, N),
labels (B,), bag index (B,)). An image without a tile in the embeddings is listed as a problem (`no-tile`) and left
out, never an empty bag; a patient whose images carry two labels is an error naming the patient.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from histoflow.common.errors import ConfigError
from histoflow.data.datamodule import ROLES, ShardDataModule
from histoflow.data.folds import SplitConfig
from histoflow.data.problems import Problem
from histoflow.data.shards import parse_key, stack_npy, tar_samples
from histoflow.features.bag_targets import (
    attach_targets,
    image_task_folds,
    stratified_by,
    table_targets,
    task_of,
)
from histoflow.features.slide_features import read_slide_features

log = logging.getLogger(__name__)
LEVELS = ("image", "slide", "patient")


@dataclass
class Bag:
    """One bag: its tiles' features (N, D) float32 and coordinates (N, 4: source index, x, y, rot; the source an
    image's manifest index or a slide's row in the cohort index), its label (class index), name (the image, slide
    or patient), patient (group) and fold."""

    name: str
    label: int
    features: torch.Tensor
    coords: np.ndarray
    group: str
    fold: str
    images: list[str] = field(default_factory=list)
    side: int | None = None
    mpp: float | None = None
    coords_um: np.ndarray | None = None  # (N, 2) microns of each tile's top-left corner, where the scan says
    target: np.ndarray | None = None  # task=survival|regression: (time, event) or (value,) (features/bag_targets.py)

    def __len__(self) -> int:
        return len(self.features)


def read_tiles(urls: Iterable[str | Path]) -> dict[int, tuple[list[np.ndarray], list[tuple[int, ...]], int]]:
    """Every sample of embedding shards grouped by image (manifest index): (vectors, (index, x, y, rot), class),
    tiles in the order the shards hold them."""
    images: dict[int, tuple[list[np.ndarray], list[tuple[int, ...]], int]] = {}
    for sample in tar_samples([{"url": str(u)} for u in urls]):
        key = parse_key(sample["__key__"])
        vectors, coords, _ = images.setdefault(key["image"], ([], [], int(sample["cls"])))
        vectors.append(sample["npy"])
        coords.append((key["image"], key["x"], key["y"], key["rot"]))
    return images


def image_bags(urls: Sequence[str | Path], manifest: Sequence[Mapping[str, Any]], classes: Sequence[str],
               side: int | None = None) -> tuple[list[Bag], list[Problem]]:
    """One bag per image of `manifest` (its rows: index, image, label, group, fold) from embedding shards `urls`;
    an image without a tile there is a problem, left out."""
    tiles = read_tiles(urls)
    bags, problems = [], []
    for row in manifest:
        found = tiles.get(int(row["index"]))
        if not found:
            problems.append(Problem(str(row["image"]), "no-tile", "no window of the image in the embeddings (too "
                                    "small for one window, or no tissue): left out of the bags"))
            continue
        vectors, coords, _ = found
        bags.append(Bag(str(row["image"]), classes.index(row["label"]),
                        torch.from_numpy(stack_npy(vectors)).float(), np.asarray(coords, dtype=np.int64),
                        str(row.get("group") or row["image"]), str(row["fold"]), [str(row["image"])], side))
    return bags, problems


def patient_bags(bags: Sequence[Bag], classes: Sequence[str]) -> list[Bag]:
    """The image bags of each patient pooled into one bag; a patient with two labels is a ConfigError naming it."""
    by_patient: dict[str, list[Bag]] = {}
    for bag in bags:
        by_patient.setdefault(bag.group, []).append(bag)
    out = []
    for patient, members in by_patient.items():
        labels = sorted({classes[b.label] for b in members})
        if len(labels) > 1:
            raise ConfigError(f"patient {patient}: its images carry {len(labels)} labels ({', '.join(labels)}), but a "
                              "patient bag has one. Fix: correct the labels or the data.groups table, or train on "
                              "image bags (bag.level=image)")
        targets = {tuple(b.target) for b in members if b.target is not None}
        if len(targets) > 1:
            raise ConfigError(f"patient {patient}: its images or slides carry {len(targets)} targets "
                              f"({', '.join(map(str, sorted(targets)))}), but a patient bag has one. Fix: correct the "
                              "target table (task.table), or train on image or slide bags")
        out.append(Bag(patient, members[0].label, torch.cat([b.features for b in members]),
                       np.concatenate([b.coords for b in members]), patient, members[0].fold,
                       [i for b in members for i in b.images], members[0].side,
                       coords_um=None if any(b.coords_um is None for b in members)
                       else np.concatenate([b.coords_um for b in members]), target=members[0].target))
    return out


def cohort_bags(index: str | Path, classes: Sequence[str], level: str = "slide",
                folds: Mapping[str, str] | None = None) -> tuple[list[Bag], list[Problem]]:
    """Slide bags (or, level=patient, a patient's slides pooled) from a cohort index of slide feature files
    (features/slide_features.py, written by `histoflow embed slides=...`): coords (N, 4) are (the slide's row in the
    index, x, y, 0), x, y level-0 pixels; coords_um the same x, y in microns; `folds` gives each slide's fold (slide
    -> fold). A slide whose shard holds no tile, or is missing, is a problem, left out; a patient whose slides carry
    two labels is an error naming the patient."""
    index = Path(index)
    with index.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    bags, problems = [], []
    for number, row in enumerate(rows):
        shard = index.parent / row["shard"] if row.get("shard") else None
        if shard is None or not shard.is_file():
            problems.append(Problem(row["slide"], "no-shard", f"no feature shard ({row.get('shard') or 'none'})"))
            continue
        found = read_slide_features(shard)
        if len(found["features"]) == 0:
            problems.append(Problem(row["slide"], "no-tile", "the slide's shard holds no tile: left out"))
            continue
        if row["label"] not in classes:
            raise ConfigError(f"slide {row['slide']} ({index}): label {row['label']!r} is not one of "
                              f"{list(classes)}. Fix: data.classes, or the slide table's label")
        px = np.asarray(found["coords_px"], dtype=np.int64).reshape(-1, 2)
        coords = np.column_stack([np.full(len(px), number), px, np.zeros(len(px), dtype=np.int64)])
        fold = (folds or {}).get(row["slide"], str(row.get("fold", "")))
        bags.append(Bag(row["slide"], list(classes).index(row["label"]), torch.from_numpy(found["features"]).float(),
                        coords, row.get("patient") or row["slide"], fold, [row["slide"]],
                        coords_um=np.asarray(found["coords_um"])))
    return (patient_bags(bags, classes) if level == "patient" else bags), problems


def pad_bags(bags: Sequence[tuple[Bag, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """collate_fn of (bag, index) pairs: features (B, N, D) zero-padded to the longest bag, mask (B, N) True on
    real tiles, labels (B,) (a task's targets (B, T) where bags carry them), indices (B,)."""
    if any(len(b) == 0 for b, _ in bags):
        raise ValueError("an empty bag reached a batch: bags without tiles are left out when bags are built")
    longest = max(len(b) for b, _ in bags)
    dim = bags[0][0].features.shape[1]
    x = torch.zeros(len(bags), longest, dim)
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, (bag, _) in enumerate(bags):
        x[i, :len(bag)] = bag.features
        mask[i, :len(bag)] = True
    labels = torch.tensor([b.label for b, _ in bags], dtype=torch.long)
    if bags[0][0].target is not None:  # task=survival|regression: (B, 2) time, event or (B, 1) values
        labels = torch.as_tensor(np.stack([b.target for b, _ in bags]), dtype=torch.float32)
    return x, mask, labels, torch.tensor([i for _, i in bags], dtype=torch.long)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, bags: Sequence[Bag]) -> None:
        self.bags = bags

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[Bag, int]:
        return self.bags[i], i


def check_one_side(bags: Mapping[str, Sequence[Bag]], fold: str) -> None:
    """A patient bag lies on one side of the fold: a patient in two roles is a ConfigError naming it."""
    seen: dict[str, str] = {}
    for role, members in bags.items():
        for bag in members:
            if seen.setdefault(bag.name, role) != role:
                raise ConfigError(f"patient {bag.name} has images or slides in both {seen[bag.name]} and {role} of "
                                  f"fold {fold}: a patient bag must lie on one side. Fix: fold by patient "
                                  "(protocol=cases, data.groups, or a slide table's patient column)")


class BagLoaders:
    """What every DataModule of bags shares: the `bag` section (level, batch_size, balanced: class-balanced
    sampling of the training bags, seed), the bags of each role, and their loaders of padded batches (features,
    mask, labels, bag indices). Subclasses fill `bags` (train/val/test), `problems`, `classes` and `num_classes`."""

    levels: tuple[str, ...] = LEVELS
    samples_are_bags = True  # train.py: this data config gives bags as it is (no swap to BagDataModule)

    def _read_bag_section(self, bag: Mapping[str, Any] | None) -> None:
        bag = dict(bag or {})
        self.level = str(bag.get("level", self.levels[0]))
        if self.level not in self.levels:
            raise ConfigError(f"bag.level={self.level}: expected one of {', '.join(self.levels)} with this data "
                              f"({type(self).__name__}); slide bags come from a slide table (data=slides)")
        self.bag_batch_size = int(bag.get("batch_size", 16))
        self.balanced = bool(bag.get("balanced", False))
        self.seed = int(bag.get("seed", 0))
        self.bags: dict[str, list[Bag]] = {}
        self.problems: list[Problem] = []

    def _loader(self, role: str, train: bool) -> DataLoader | list:
        bags = self.bags.get(role) or []
        if not bags:
            return []
        trainer = getattr(self, "trainer", None)
        generator = torch.Generator().manual_seed(self.seed + (trainer.current_epoch if trainer else 0))
        sampler = None
        if train and self.balanced:
            counts = np.bincount([b.label for b in bags], minlength=self.num_classes)
            weights = [1.0 / counts[b.label] for b in bags]
            sampler = WeightedRandomSampler(weights, len(bags), replacement=True, generator=generator)
        return DataLoader(_Indexed(bags), batch_size=self.bag_batch_size, shuffle=train and sampler is None,
                          sampler=sampler, collate_fn=pad_bags, generator=generator if train else None,
                          num_workers=0)

    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test", False)

    def tile_sources(self, bags: Sequence[Bag]) -> dict[str, dict[str, Any]]:
        """Where the tiles of `bags` come from, by the source index in their coords[:, 0]: {"path": the image or
        slide file, and for an image "side" (window px) and "stride", for a slide "shard" (its feature shard, whose
        meta holds the tile geometry)}: what attention maps and galleries read."""
        raise NotImplementedError

    def _say_problems(self, what: str) -> None:
        if self.problems:
            log.warning("%d %s left out of the bags: %s", len(self.problems), what,
                        ", ".join(f"{p.path} ({p.kind})" for p in self.problems[:5]))


class BagDataModule(BagLoaders, ShardDataModule):
    """The frozen-feature DataModule of one held-out fold whose samples are bags: the same preparation and
    embedding, batches of padded bags (features, mask, labels, bag indices). Folds: the prepared manifest's for
    classification; for task=survival|regression drawn again from the manifest's groups (patients never on both
    sides), stratified by the event or the target's quantile bin (features/bag_targets.image_task_folds).

    bag: the `bag` section of train.yaml (level: image | patient, batch_size, balanced, seed)."""

    levels = ("image", "patient")

    def __init__(self, fold: int | str = 1, preprocess: Mapping[str, Any] | None = None, embed: Any = None,
                 bag: Mapping[str, Any] | None = None, task: Mapping[str, Any] | None = None, **data: Any) -> None:
        super().__init__(fold=fold, preprocess=preprocess, embed=embed, **data)
        self._read_bag_section(bag)
        self.task = task_of(task)  # classification, or the targets of task=survival|regression (task.table)
        self.stratified_by = stratified_by(self.task)  # what the folds are stratified by (the task report says it)

    def setup(self, stage: str | None = None) -> None:
        if self.embed is None:
            raise ConfigError("bags are made of a frozen encoder's embeddings. Fix: add encoder=<name> (conf/encoder)")
        super().setup(stage)
        if self.bags:
            return
        manifest = self.prepared.manifest()
        self._paths = {int(r["index"]): str(self.prepared.root / r["image"]) for r in manifest}
        targets = table_targets(self.task)
        if self.task.name == "classification":  # the manifest's folds, each role read from its own shards
            role_of = {r["image"]: self._role(r) for r in manifest}
            parts = {role: image_bags(getattr(self.split, role), [r for r in manifest if role_of[r["image"]] == role],
                                      self.classes, self.prepared.patch_side) for role in ROLES}
        else:  # folds drawn again by patient, stratified by the task's target: every shard read once, then sorted
            rows = image_task_folds(manifest, SplitConfig.from_config(self.data.get("split")), self.task, targets)
            if self.fold not in {str(r["fold"]) for r in rows}:
                raise ConfigError(f"fold={self.fold}: the folds of task={self.task.name} are "
                                  f"{sorted({str(r['fold']) for r in rows})} (data.split)")
            role_of = {r["image"]: self._role(r) for r in rows}
            urls = list(dict.fromkeys([*self.split.train, *self.split.val, *self.split.test]))
            every, problems = image_bags(urls, rows, self.classes, self.prepared.patch_side)
            parts = {role: ([b for b in every if role_of[b.name] == role], problems if role == "test" else [])
                     for role in ROLES}
        for role, (bags, problems) in parts.items():
            bags, untargeted = attach_targets(bags, targets, self.task)
            self.bags[role] = patient_bags(bags, self.classes) if self.level == "patient" else bags
            self.problems += problems + untargeted
        if self.level == "patient":
            check_one_side(self.bags, self.fold)
        self._say_problems("image(s) without a tile")
        if not self.bags["train"] and stage in (None, "fit"):
            raise ConfigError(f"fold {self.fold} leaves no training bag. Fix: choose another fold or more images")

    def _role(self, row: Mapping[str, Any]) -> str:
        return "test" if str(row["fold"]) == self.fold else "val" if row["val"] else "train"

    def tile_sources(self, bags: Sequence[Bag]) -> dict[str, dict[str, Any]]:
        patches = self.data.get("patches") or {}
        indices = sorted({int(i) for b in bags for i in np.unique(b.coords[:, 0])})
        return {str(i): {"path": self._paths[i], "side": self.prepared.patch_side,
                         "stride": patches.get("stride") or self.prepared.patch_side} for i in indices}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bag": {"level": self.level}}
