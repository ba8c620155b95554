"""Bags of frozen tile embeddings: the samples of heads that learn from a label per image or patient (models/mil.py).

A bag is every window embedding of one image (`bag.level=image`) or of every image of one patient
(`bag.level=patient`, the patient from data.groups), read from the cached embeddings of the frozen-feature
workflow (features/embeddings.py), with each tile's coordinates kept beside its features: (image, x, y, rot) in
the prepared image's pixels, the window's side in `Bag.side`. Microns are not known for images without a
resolution (the lymphoma images): `Bag.mpp` is None there.

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
from histoflow.data.problems import Problem
from histoflow.data.shards import parse_key, stack_npy, tar_samples
from histoflow.features.cohort import read_shard

log = logging.getLogger(__name__)
LEVELS = ("image", "patient")


@dataclass
class Bag:
    """One bag: its tiles' features (N, D) float32 and coordinates (N, 4: manifest index, x, y, rot), its label
    (class index), name (the image's path, or the patient), patient (group) and fold."""

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
        out.append(Bag(patient, members[0].label, torch.cat([b.features for b in members]),
                       np.concatenate([b.coords for b in members]), patient, members[0].fold,
                       [i for b in members for i in b.images], members[0].side,
                       coords_um=None if any(b.coords_um is None for b in members)
                       else np.concatenate([b.coords_um for b in members])))
    return out


def cohort_bags(index: str | Path, classes: Sequence[str], level: str = "slide") -> tuple[list[Bag], list[Problem]]:
    """Slide bags (or, level=patient, a patient's slides pooled) from a cohort index of per-slide feature shards
    (features/cohort.py, `histoflow embed slides=...`): coords are level-0 pixels (x, y), coords_um the same in
    microns. A slide whose shard holds no tile, or is missing, is a problem, left out; a patient whose slides carry
    two labels is an error naming the patient. Not yet wired into training (folds by patient of a slide table)."""
    index = Path(index)
    with index.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    bags, problems = [], []
    for row in rows:
        shard = index.parent / row["shard"] if row.get("shard") else None
        if shard is None or not shard.is_file():
            problems.append(Problem(row["slide"], "no-shard", f"no feature shard ({row.get('shard') or 'none'})"))
            continue
        found = read_shard(shard)
        if len(found["features"]) == 0:
            problems.append(Problem(row["slide"], "no-tile", "the slide's shard holds no tile: left out"))
            continue
        if row["label"] not in classes:
            raise ConfigError(f"slide {row['slide']}: label {row['label']!r} is not one of {list(classes)}")
        bags.append(Bag(row["slide"], list(classes).index(row["label"]), torch.from_numpy(found["features"]).float(),
                        np.asarray(found["coords_px"]), row.get("patient") or row["slide"], str(row.get("fold", "")),
                        [row["slide"]], coords_um=np.asarray(found["coords_um"])))
    return (patient_bags(bags, classes) if level == "patient" else bags), problems


def pad_bags(bags: Sequence[tuple[Bag, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """collate_fn of (bag, index) pairs: features (B, N, D) zero-padded to the longest bag, mask (B, N) True on
    real tiles, labels (B,), indices (B,)."""
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
    return x, mask, labels, torch.tensor([i for _, i in bags], dtype=torch.long)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, bags: Sequence[Bag]) -> None:
        self.bags = bags

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[Bag, int]:
        return self.bags[i], i


class BagDataModule(ShardDataModule):
    """The frozen-feature DataModule of one held-out fold whose samples are bags: the same preparation, embedding
    and folds (patients never on both sides), batches of padded bags (features, mask, labels, bag indices).

    bag: the `bag` section of train.yaml (level: image | patient, batch_size, balanced: class-balanced sampling of
    the training bags)."""

    def __init__(self, fold: int | str = 1, preprocess: Mapping[str, Any] | None = None, embed: Any = None,
                 bag: Mapping[str, Any] | None = None, **data: Any) -> None:
        super().__init__(fold=fold, preprocess=preprocess, embed=embed, **data)
        bag = dict(bag or {})
        self.level = str(bag.get("level", "image"))
        if self.level not in LEVELS:
            raise ConfigError(f"bag.level={self.level}: expected one of {', '.join(LEVELS)} (slide bags come from a "
                              "cohort's feature shards, not yet read here)")
        self.bag_batch_size = int(bag.get("batch_size", 16))
        self.balanced = bool(bag.get("balanced", False))
        self.seed = int(bag.get("seed", 0))
        self.bags: dict[str, list[Bag]] = {}
        self.problems: list[Problem] = []

    def setup(self, stage: str | None = None) -> None:
        if self.embed is None:
            raise ConfigError("bags are made of a frozen encoder's embeddings. Fix: add encoder=<name> (conf/encoder)")
        super().setup(stage)
        if self.bags:
            return
        manifest = self.prepared.manifest()
        role_of = {r["index"]: "test" if str(r["fold"]) == self.fold else "val" if r["val"] else "train"
                   for r in manifest}
        for role in ROLES:
            rows = [r for r in manifest if role_of[r["index"]] == role]
            bags, problems = image_bags(getattr(self.split, role), rows, self.classes, self.prepared.patch_side)
            self.bags[role] = patient_bags(bags, self.classes) if self.level == "patient" else bags
            self.problems += problems
        if self.level == "patient":
            seen: dict[str, str] = {}
            for role in ROLES:
                for bag in self.bags[role]:
                    if seen.setdefault(bag.name, role) != role:
                        raise ConfigError(f"patient {bag.name} has images in both {seen[bag.name]} and {role} of fold "
                                          f"{self.fold}: a patient bag must lie on one side. Fix: fold by patient "
                                          "(protocol=cases, data.groups) and validate on whole patients")
        if self.problems:
            log.warning("%d image(s) without a tile left out of the bags: %s", len(self.problems),
                        ", ".join(p.path for p in self.problems[:5]))
        if not self.bags["train"] and stage in (None, "fit"):
            raise ConfigError(f"fold {self.fold} leaves no training bag. Fix: choose another fold or more images")

    def _loader(self, role: str, train: bool) -> DataLoader | list:
        bags = self.bags.get(role) or []
        if not bags:
            return []
        generator = torch.Generator().manual_seed(self.seed + (self.trainer.current_epoch if self.trainer else 0))
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

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bag": {"level": self.level}}
