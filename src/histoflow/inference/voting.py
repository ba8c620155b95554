"""Whole-image prediction by patch voting: grid patches of each image, batched inference, votes per image.

Loader workers read each image, cut its grid windows (a strided view, no per-patch loop) and pack the uint8 windows
of consecutive images into full batches in shared memory, while the main process runs the nets: reading and cutting
overlap the forward passes. On the model's device each distinct preprocessing (crop, conversion, normalisation,
resize, test-time views) runs once per batch for all the fold models that share it (window_inputs.SharedInputs);
a model on the CPU with loader workers has them make its batches' inputs instead, beside the net (measured faster on
a 2-core machine: the main process's threads are the net's).
Each patch carries its image's index; votes and probabilities are summed per image with index_add.
Fold models that share a frozen encoder (heads trained with encoder=..., the same weights and preprocessing) are
one EncoderGroup: the encoder runs once per window, and each head reads its features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from histoflow.common.errors import ConfigError
from histoflow.common.machine import resolve_device
from histoflow.common.progress import progress_bar
from histoflow.data.images import UnreadableImage, read_rgb
from histoflow.data.patches import PatchConfig, extract_patches
from histoflow.data.pipeline import as_made
from histoflow.data.problems import Problem
from histoflow.data.transforms import PatchTransform
from histoflow.inference.window_inputs import SharedInputs, Stain, stain_key

# Test-time views of a patch: (counter-clockwise quarter turns, mirrored first); together the 8 symmetries of a square.
VIEWS: dict[str, tuple[int, bool]] = {
    "identity": (0, False), "rot90": (1, False), "rot180": (2, False), "rot270": (3, False),
    "flip": (0, True), "flip_rot90": (1, True), "flip_rot180": (2, True), "flip_rot270": (3, True),
}


def tta_views(tta: bool | Sequence[str]) -> list[tuple[int, bool]]:
    """The views of `tta`: false -> the patch itself; true -> all 8 flips and rotations; or a list of VIEWS names."""
    if isinstance(tta, str):  # `tta=maybe` once became the views m, a, y, b, e
        raise ConfigError(f"tta={tta!r}: expected true, false or a list of views such as [identity, rot90]; "
                          f"views: {', '.join(VIEWS)}")
    names = list(VIEWS) if tta is True else ["identity"] if not tta else list(tta)
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise ConfigError(f"tta={list(tta)}: unknown view(s) {unknown}; choose from {list(VIEWS)}, or true/false")
    return [VIEWS[n] for n in names]


def grid_config(size: int, stride: int) -> PatchConfig:
    """The prediction grid: size-px windows every stride px, unrotated, none dropped."""
    return PatchConfig(size=size, stride=stride, rotations=[0], min_tissue=0.0)


@dataclass
class EncoderGroup:
    """Models that see the same input features: one encoder (a frozen one shared by fold heads, or the identity
    before whole nets), the heads on its output, and the transform that prepares its input."""

    encoder: nn.Module
    heads: list[nn.Module]
    transform: PatchTransform


Models = Sequence[EncoderGroup | tuple[nn.Module, PatchTransform]]


def as_groups(models: Models) -> list[EncoderGroup]:
    """EncoderGroups as they are; a (net, transform) pair as a group of its own (the net whole, as a head)."""
    return [m if isinstance(m, EncoderGroup) else EncoderGroup(nn.Identity(), [m[0]], m[1]) for m in models]


@dataclass
class ImageItem:
    """One image's uint8 grid windows x (stain steps, patches, s, s, 3) and their origins, or why it failed."""

    index: int
    x: torch.Tensor | None = None
    origins: torch.Tensor | None = None  # (patches, 2): x, y of each window's top-left corner
    problem: Problem | None = None


class ImagePatches(Dataset):
    """Grid windows of whole images, uint8 as cut, one image per item: one set for each stain step (None: the image
    as read), applied to the whole image before cutting."""

    def __init__(self, paths: Sequence[str | Path], grid: PatchConfig, stains: Sequence[Stain] = (None,)) -> None:
        self.paths, self.grid, self.stains = list(paths), grid, list(stains)
        if len({stain_key(s) for s in self.stains}) < len(self.stains):
            raise ValueError("stain steps listed twice: pass each distinct step once (SharedInputs.stains)")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageItem:
        path = str(self.paths[index])
        try:
            return self._patches(index)
        except UnreadableImage as e:
            return ImageItem(index, problem=Problem(path, "corrupt", str(e)))
        except MemoryError as e:  # a huge image must not stop the others; a bug elsewhere still fails the run
            return ImageItem(index, problem=Problem(path, "out-of-memory", f"{path}: {type(e).__name__}: {e}"))

    def _patches(self, index: int) -> ImageItem:
        path = self.paths[index]
        image, _ = read_rgb(path)
        windows = []
        for stain in self.stains:
            cut, xs, ys, _ = extract_patches(stain(image) if stain else image, self.grid)
            if not len(cut):
                h, w = image.shape[:2]
                return ImageItem(index, problem=Problem(
                    str(path), "too-small", f"{path}: {w}x{h} px is smaller than the {self.grid.size}-px window"))
            windows.append(cut)
        origins = torch.from_numpy(np.stack([xs, ys], axis=1))
        return ImageItem(index, torch.from_numpy(np.stack(windows)), origins)


@dataclass
class PatchBatch:
    """Up to a batch of patches of consecutive images, with the image index of each, and the images begun or failed."""

    x: torch.Tensor | None  # (stain steps, patches, s, s, 3) uint8 windows
    ids: torch.Tensor | None  # (patches,) image index of each patch
    begun: list[tuple[int, int]]  # (image, its patch count) for images whose first patches are in x
    problems: list[tuple[int, Problem]]  # (image, what went wrong) for images that failed since the last batch
    inputs: list[torch.Tensor] | None = None  # each distinct preprocessing's (patches * views, 3, c, c), by a worker

    def pin_memory(self) -> "PatchBatch":
        """Page-locked copy for fast copies to a GPU (the DataLoader calls this when pin_memory is on)."""
        return PatchBatch(None if self.x is None else self.x.pin_memory(), self.ids, self.begun, self.problems,
                          None if self.inputs is None else [x.pin_memory() for x in self.inputs])


class PatchBatches(IterableDataset):
    """Every image's patches packed into full batches across image boundaries, in the loader workers.

    Each worker takes every k-th image and fills its batches in shared memory, so the main process
    receives a batch without any copy and spends its time on the nets. With `prepare` (a net on the CPU) a worker
    ships the inputs made of its batch instead, once per distinct preprocessing.
    """

    def __init__(self, images: ImagePatches, per_batch: int, prepare: SharedInputs | None = None) -> None:
        self.images, self.per_batch, self.prepare = images, per_batch, prepare

    def _batch(self, x: torch.Tensor | None, ids: torch.Tensor | None, begun: list[tuple[int, int]],
               problems: list[tuple[int, Problem]]) -> PatchBatch:
        """A batch of windows as cut, or (with `prepare`) of the inputs made of them here, once per preprocessing."""
        if self.prepare is None or x is None:
            return PatchBatch(x, ids, begun, problems)
        return PatchBatch(None, ids, begun, problems, self.prepare.prepare(x))

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty(like.shape[0], self.per_batch, *like.shape[2:], dtype=like.dtype)
        # filled in place in shared memory: passing it to the main process then copies nothing
        return out.share_memory_() if get_worker_info() is not None else out

    def __iter__(self) -> Iterator[PatchBatch]:
        worker = get_worker_info()
        mine = range(worker.id, len(self.images), worker.num_workers) if worker else range(len(self.images))
        x, ids, filled = None, torch.empty(self.per_batch, dtype=torch.long), 0
        begun: list[tuple[int, int]] = []
        problems: list[tuple[int, Problem]] = []
        for index in mine:
            item = self.images[index]
            if item.x is None:
                problems.append((index, item.problem))
                continue
            n = item.x.shape[1]
            begun.append((index, n))
            start = 0
            while start < n:
                x = self._empty(item.x) if x is None else x
                take = min(n - start, self.per_batch - filled)
                x[:, filled:filled + take] = item.x[:, start:start + take]
                ids[filled:filled + take] = index
                filled, start = filled + take, start + take
                if filled == self.per_batch:
                    yield self._batch(x, ids, begun, problems)
                    x, ids, filled, begun, problems = None, torch.empty(self.per_batch, dtype=torch.long), 0, [], []
        if filled or problems:
            yield self._batch(x[:, :filled] if x is not None else None, ids[:filled] if filled else None, begun,
                              problems)


def by_votes(votes: np.ndarray, prob_sum: np.ndarray) -> np.ndarray:
    """Class with the most patch votes (the tutorial's rule); a tie goes to the tied class with the higher summed
    probability, and a tie in that too to the class listed first."""
    tied = votes == votes.max(axis=1, keepdims=True)
    return np.where(tied, prob_sum, -np.inf).argmax(axis=1)


def by_mean_probability(votes: np.ndarray, prob_sum: np.ndarray) -> np.ndarray:
    """Class with the highest mean patch probability; a tie goes to the class listed first."""
    return prob_sum.argmax(axis=1)


AGGREGATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"vote": by_votes, "mean": by_mean_probability}


@dataclass
class Votes:
    """Per image: patch votes per class, summed patch probabilities, patch count; and the images that failed."""

    paths: list[str]
    votes: np.ndarray  # (images, classes) int64
    prob_sum: np.ndarray  # (images, classes) float64
    patches: np.ndarray  # (images,) int64; 0 for a failed image
    problems: dict[int, Problem] = field(default_factory=dict)  # image index -> what went wrong
    seconds: float = 0.0
    model_prob_sum: np.ndarray | None = None  # (images, models, classes) float64: each model's summed probabilities

    @property
    def ok(self) -> np.ndarray:
        """Indices of the images that were predicted."""
        return np.flatnonzero(self.patches > 0)

    def mean_prob(self) -> np.ndarray:
        return self.prob_sum / np.maximum(self.patches, 1)[:, None]

    def labels(self, aggregate: str = "vote") -> np.ndarray:
        """Predicted class index of every image (-1 where it failed), by the `aggregate` rule."""
        if aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate={aggregate!r}: expected one of {list(AGGREGATES)}")
        out = np.full(len(self.paths), -1)
        out[self.ok] = AGGREGATES[aggregate](self.votes[self.ok], self.prob_sum[self.ok])
        return out


def group_probabilities(groups: Sequence[EncoderGroup | nn.Module], inputs: Sequence[torch.Tensor],
                        views: int) -> torch.Tensor:
    """Each model's class probabilities (models, B, C) of each group's input (B * V, 3, c, c) on its device, the views
    of a patch consecutive: softmax per view, averaged over views; a group's encoder runs once for all its heads."""
    out = []
    for group, xg in zip(groups, inputs):
        if not isinstance(group, EncoderGroup):  # a whole net (slide maps pass nets)
            group = EncoderGroup(nn.Identity(), [group], None)  # type: ignore[arg-type]
        features = group.encoder(xg)
        out += [head(features).float().softmax(-1).unflatten(0, (-1, views)).mean(1).cpu() for head in group.heads]
    return torch.stack(out)


def model_probabilities(groups: Sequence[EncoderGroup | nn.Module], x: torch.Tensor,
                        device: torch.device) -> torch.Tensor:
    """Each model's class probabilities (models, B, C) of patches x (G, B, V, 3, c, c) already transformed, one input
    per group (slide maps): softmax per view, averaged over views; a group's encoder runs once for all its heads."""
    v = x.shape[2]
    return group_probabilities(groups, [xg.flatten(0, 1).to(device, non_blocking=True) for xg in x], v)


def spread_columns(per_model: np.ndarray, classes: Sequence[str]) -> dict[str, object]:
    """prob_sd_<class> (the models' sd around their mean, ddof=0) and models_agree (each model's own most probable
    class the same) of one image's (models, classes) probabilities."""
    own = per_model.argmax(1)
    return {**{f"prob_sd_{c}": round(float(s), 6) for c, s in zip(classes, per_model.std(0))},
            "models_agree": bool((own == own[0]).all())}


def prediction_columns(per_model: np.ndarray, classes: Sequence[str]) -> dict[str, object]:
    """One bag's or image's columns from its (models, classes) probabilities: predicted (the mean's most probable
    class), confidence, prob_<class> (the models' mean), then spread_columns (prob_sd_<class>, models_agree)."""
    mean = per_model.mean(0)
    k = int(mean.argmax())
    return {"predicted": classes[k], "confidence": round(float(mean[k]), 6),
            **{f"prob_{c}": round(float(p), 6) for c, p in zip(classes, mean)}, **spread_columns(per_model, classes)}


def fold_labels(models: Sequence[object]) -> list[str]:
    """Each model's column label: its training fold (`fold`), or, where an ensemble repeats a fold, the fold and
    its place among that fold's models ("2.1", "2.2"): no model's column overwrites another's."""
    folds = [str(getattr(m, "fold")) for m in models]
    if len(set(folds)) == len(folds):
        return folds
    seen: dict[str, int] = {}
    labels = []
    for fold in folds:
        seen[fold] = seen.get(fold, 0) + 1
        labels.append(f"{fold}.{seen[fold]}")
    return labels


def value_columns(per_model: np.ndarray, models: Sequence[object]) -> dict[str, object]:
    """One bag's columns from its (models, 1) survival risks or regression values: risk|value (the fold models'
    mean), its sd (ddof=0), and each fold model's (risk_fold<k>, fold_labels)."""
    name = "risk" if getattr(models[0], "task").name == "survival" else "value"
    v = np.asarray(per_model)[:, 0]
    return {name: round(float(v.mean()), 6), f"{name}_sd": round(float(v.std()), 6),
            **{f"{name}_fold{k}": round(float(x), 6) for k, x in zip(fold_labels(models), v)}}


def mean_probabilities(nets: Sequence[EncoderGroup | nn.Module], x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Class probabilities (B, C) of patches x (G, B, V, 3, c, c): softmax per view, averaged over views and models."""
    return model_probabilities(nets, x, device).mean(0)


def predict_images(paths: Sequence[str | Path], models: Models, num_classes: int,
                   grid: PatchConfig, views: Sequence[tuple[int, bool]] = ((0, False),), batch_size: int = 512,
                   num_workers: int = 1, device: str = "auto", progress: bool = True,
                   description: str = "images") -> Votes:
    """Votes and probabilities of every image's grid patches, from the models averaged (an ensemble when several):
    (net, transform) pairs, or EncoderGroups whose encoder runs once for all their heads. The workers cut uint8
    windows; each distinct transform and the test-time views run on `device`, once per batch for all its models."""
    dev = resolve_device(device)
    groups = as_groups(models)
    for group in groups:
        group.encoder.to(dev).eval()
        for head in group.heads:
            head.to(dev).eval()
    per_batch = max(1, batch_size // len(views))  # a forward pass takes patches x views inputs
    inputs = SharedInputs([g.transform for g in groups], views)  # once per batch for each distinct preprocessing
    in_workers = dev.type == "cpu" and num_workers > 0  # the net's device is the CPU: the workers' cores make them
    dataset = PatchBatches(ImagePatches(paths, grid, inputs.stains), per_batch, inputs if in_workers else None)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=as_made,
                        pin_memory=dev.type == "cuda", prefetch_factor=4 if num_workers else None)
    n = len(paths)
    votes = torch.zeros(n, num_classes, dtype=torch.long)
    prob_sum = torch.zeros(n, num_classes, dtype=torch.float64)
    model_prob_sum = torch.zeros(n, sum(len(g.heads) for g in groups), num_classes, dtype=torch.float64)
    patches = np.zeros(n, dtype=np.int64)
    waiting = np.zeros(n, dtype=np.int64)  # patches of each image not inferred yet
    problems: dict[int, Problem] = {}
    t0, finished = time.perf_counter(), 0
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task(description, total=n, rate="")
        for batch in loader:
            for index, count in batch.begun:
                patches[index] = waiting[index] = count
            problems.update(batch.problems)
            done = len(batch.problems)
            if batch.ids is not None:
                made = batch.inputs if in_workers else inputs.prepare(batch.x.to(dev, non_blocking=True))
                per_model = group_probabilities(groups, inputs.per_model(made), len(views))
                probs = per_model.mean(0)
                model_prob_sum.index_add_(0, batch.ids, per_model.transpose(0, 1).double())
                votes.index_put_((batch.ids, probs.argmax(1)), torch.ones(len(probs), dtype=torch.long),
                                 accumulate=True)
                prob_sum.index_add_(0, batch.ids, probs.double())
                images, counts = np.unique(batch.ids.numpy(), return_counts=True)
                waiting[images] -= counts
                done += int((waiting[images] == 0).sum())  # images whose last patches were in this batch
            if done:
                finished += done
                bar.update(task, completed=finished, rate=f"{finished / (time.perf_counter() - t0):.1f} images/s")
    return Votes([str(p) for p in paths], votes.numpy(), prob_sum.numpy(), patches, problems,
                 time.perf_counter() - t0, model_prob_sum.numpy())
