"""Shards -> batches: the WebDataset pipeline every loader of prepared shards runs.

Training: each DDP rank takes every world-th shard, each loader worker every n-th of those. A worker reads its
shards endlessly, in a fresh random order on every pass, through a shuffle buffer. The shuffles draw from the
worker's `random`, which DataLoader seeds per worker (reproducibly under seed_everything(workers=True)), where
webdataset's own shuffles are seeded by the clock, or repeat one order every epoch. Evaluation: no shuffling, no
repetition, every sample exactly once.
"""

from __future__ import annotations

import functools
import random
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import webdataset as wds

from histoflow.data.shards import parse_key, stack_npy, tar_samples
from histoflow.data.transforms import PatchTransform

T = TypeVar("T")
KEY_FIELDS = ("image", "x", "y", "rot")  # columns of the keys tensor: manifest index, patch origin, rotation


def as_made(batch: T) -> T:
    """collate_fn of a loader whose dataset yields whole batches (batch_size=None): each item as it is. A module
    function, not a lambda, so spawned workers can pickle it."""
    return batch


def _rank_shards(src: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """This DDP rank's share of the shards."""
    # unlike wds.split_by_node, rank and world size are fixed when the loader is built, so workers started
    # by any method (fork, spawn) split alike, whatever environment variables they see
    yield from islice(src, rank, None, world_size)


def _shuffled_shards(src: Iterable[dict]) -> Iterator[dict]:
    shards = list(src)
    random.shuffle(shards)
    yield from shards


def _shuffled_samples(src: Iterable[Any], size: int) -> Iterator[Any]:
    """Buffer shuffle, filled before the first sample so the first batches are mixed too."""
    rng = random.Random(random.getrandbits(64))
    return wds.shuffle(size, initial=size, rng=rng)(src)


def _collate(samples: list[dict], with_keys: bool) -> tuple[torch.Tensor, ...]:
    """A batch of sample dicts as tensors: patches (B, S, S, 3) uint8, labels, and keys if asked."""
    # one stage instead of to_tuple and a decoding map: webdataset's to_tuple alone costs more than
    # reading the shards
    patches = torch.from_numpy(stack_npy([s["npy"] for s in samples]))
    labels = torch.tensor([int(s["cls"]) for s in samples], dtype=torch.long)
    if not with_keys:
        return patches, labels
    keys = torch.tensor([list(parse_key(s["__key__"]).values()) for s in samples], dtype=torch.long)
    return patches, labels, keys


def _apply(batch: tuple[torch.Tensor, ...], transform: PatchTransform) -> tuple[torch.Tensor, ...]:
    return (transform(batch[0]), *batch[1:])


def shard_pipeline(urls: list[str], transform: PatchTransform | None, batch_size: int, train: bool,
                   rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                   with_keys: bool = False) -> wds.DataPipeline:
    """Shards -> batches (x, y[, keys]): once in order, or (train) an endless shuffled stream.

    x is uint8 (B, S, S, 3) when transform is None, else the transform's output.
    """
    stages: list[Callable | Any] = [wds.SimpleShardList(urls)]
    if world_size > 1:
        stages.append(functools.partial(_rank_shards, rank=rank, world_size=world_size))
    stages.append(wds.split_by_worker)
    if train:
        stages.append(_shuffled_shards)
    stages.append(tar_samples)
    if train:
        # passes over the shards repeat below the shuffle buffer and the batching, so batches run on
        # across passes: all full, however few samples a worker's shards hold. A worker without shards
        # ends (an empty pass stops the repetition), it does not spin.
        stages = [wds.DataPipeline(*stages).repeat()]
        if shuffle_buffer > 0:
            stages.append(functools.partial(_shuffled_samples, size=shuffle_buffer))
    stages.append(wds.batched(batch_size, collation_fn=functools.partial(_collate, with_keys=with_keys),
                              partial=not train))
    if transform is not None:
        stages.append(wds.map(functools.partial(_apply, transform=transform)))
    return wds.DataPipeline(*stages)
