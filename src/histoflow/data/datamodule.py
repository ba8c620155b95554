"""Stream the prepared, fold-aligned WebDataset shards as training, validation and test batches.

Training: each DDP rank takes every world-th shard, each loader worker every n-th of those. A worker
reads its shards endlessly, in a fresh random order on every pass, through a shuffle buffer; an epoch
is `epoch_batches` batches of the rank's workers together, the same number on every rank (ranks with
unequal batch counts hang DDP). The shuffles draw from the worker's `random`, which
DataLoader seeds per worker (reproducibly under seed_everything(workers=True)), where webdataset's own
shuffles are seeded by the clock, or repeat one order every epoch.

Evaluation: no shuffling, no repetition, every sample exactly once on a single process. Under DDP each
rank takes its share of the shards (ranks then see different numbers of batches: log metrics with
torchmetrics objects, which sync once at epoch end, never with per-step sync_dist); with fewer shards
than ranks every rank evaluates all of them, which repeats samples but leaves no rank empty.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, replace
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pytorch_lightning as L
import torch
import webdataset as wds

from histoflow.config import at_least, plain, read_section
from histoflow.data.embeddings import EmbeddedDataset, embed_dataset
from histoflow.data.prepare import prepare_dataset
from histoflow.data.prepared import PreparedDataset, Split
from histoflow.data.shards import parse_key, stack_npy, tar_samples
from histoflow.data.transforms import PatchTransform, build_transform
from histoflow.errors import ConfigError
from histoflow.machine import resolve_workers
from histoflow.models import model_preprocess

KEY_FIELDS = ("image", "x", "y", "rot")  # columns of the keys tensor: manifest index, patch origin, rotation
ROLES = ("train", "val", "test")


@dataclass
class LoaderConfig:
    """The `data.loader` section: batching, workers and patch transforms."""

    batch_size: int = 128
    eval_batch_size: int | None = None  # None: batch_size
    num_workers: int | str = "auto"  # per DDP rank; auto: 0 on a CPU, CPUs per rank less one beside a GPU (machine.py)
    shuffle_buffer: int = 5000  # samples held per worker for shuffling (about 4 kB each); 0: off
    crop: int | None = 32  # side of the network input cut from each patch; None: the whole patch
    normalize: str = "image"  # image | channel | imagenet | fixed (mean, std) | none; image/channel: this fold's statistics
    mean: list[float] | None = None  # normalize=fixed: RGB mean in 0-1 units, e.g. a pretrained encoder's
    std: list[float] | None = None
    resize: int | None = None  # scale each crop to this side for the net (a pretrained encoder's input); None: as cut
    interpolation: str = "bilinear"  # of resize: nearest | bilinear | bicubic
    scale: float | None = None  # image | none: divide by this after subtracting (None: 255); Caffe's mean_file: 1
    flips: bool | str = True  # training: true: random flips of both axes | horizontal: mirror only (Caffe) | false
    hed_jitter: float = 0.0  # sigma of the H&E-DAB stain jitter in training; 0: off
    colour_jitter: dict[str, float] | None = None  # brightness, contrast, saturation, hue strengths in training
    grey: bool = False  # a stain-free input: every patch as its luma in all three channels (training and prediction)
    pin_memory: bool = True  # only takes effect when CUDA is available
    persistent_workers: bool = False
    epoch_batches: int | None = None  # training batches per epoch and rank; None: training samples / (batch * ranks)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "LoaderConfig":
        return read_section(cls, cfg, "data.loader")

    def __post_init__(self) -> None:
        for key, low, optional in (("batch_size", 1, False), ("eval_batch_size", 1, True),
                                   ("shuffle_buffer", 0, False), ("crop", 1, True), ("epoch_batches", 1, True)):
            at_least(getattr(self, key), low, f"data.loader.{key}", optional)
        resolve_workers(self.num_workers, "data.loader.num_workers", "cpu")


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


class ShardDataModule(L.LightningDataModule):
    """Prepared shards of one held-out fold as Lightning loaders; built from the whole `data` config.

    preprocess: data.loader values a pretrained whole net sets (models.Preprocess.loader(): resize, normalize=fixed
    with its mean and std). encoder: a model config; then the samples are the frozen encoder's feature vectors of
    the patches (data.embeddings, made once in prepare_data), for a head to train on, and the patches go through
    the encoder's own preprocessing (its config's `preprocess` section).
    """

    def __init__(self, fold: int | str = 1, encoder: Mapping[str, Any] | None = None,
                 preprocess: Mapping[str, Any] | None = None, **data: Any) -> None:
        super().__init__()
        self.data: dict[str, Any] = {k: plain(v) for k, v in data.items()}
        self.fold = str(fold)
        self.loader = LoaderConfig.from_config(self.data.get("loader"))
        self.encoder: dict[str, Any] | None = plain(encoder) or None
        if self.encoder:
            encoder_input = model_preprocess(self.encoder, "encoder")
            preprocess = encoder_input.loader() if encoder_input else preprocess
        if preprocess:
            self.loader = replace(self.loader, **plain(preprocess))
        self.prepared: PreparedDataset | None = None
        self.features: EmbeddedDataset | None = None
        self.feature_dim: int | None = None  # the encoder's feature width, with an encoder
        self._transforms: dict[bool, PatchTransform] = {}

    def embeddings(self, prepared: PreparedDataset) -> EmbeddedDataset:
        """The encoder's features of the prepared patches: found, or made (resumed) now."""
        return embed_dataset(prepared, self.encoder, asdict(self.loader),
                             batch_size=self.loader.eval_batch_size or self.loader.batch_size)

    def prepare_data(self) -> None:
        """Prepare the shards once, and embed them when there is an encoder (Lightning calls this on one process
        per node)."""
        prepared = prepare_dataset(self.data)
        if self.encoder:
            self.embeddings(prepared)

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared data of this fold; sets classes, num_classes, input_size, stats, split."""
        if self.prepared is None:
            self.prepared = prepare_dataset(self.data, quiet=True)  # returns at once when prepared
            self.classes: list[str] = self.prepared.classes
            self.num_classes = len(self.classes)
            self.input_size: int = self.loader.resize or self.loader.crop or self.prepared.patch_side
            self.stats: dict[str, np.ndarray] = self.prepared.stats(self.fold)
            self.split: Split = self.prepared.split(self.fold)
            if self.encoder:
                self.features = self.embeddings(self.prepared)  # returns at once when embedded
                self.split, self.feature_dim = self.features.split(self.fold), self.features.dim
        if self.split.samples["train"] == 0 and stage in (None, "fit"):
            raise ConfigError(f"fold {self.fold} of {self.prepared.path} leaves no training patches. "
                             "Fix: choose another fold or more images (data.split)")

    def _world(self) -> tuple[int, int]:
        """(rank, world size): from torch.distributed when initialised, else the attached trainer."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def epoch_batches(self) -> int:
        """Training batches per epoch on every rank."""
        if self.loader.epoch_batches:
            return int(self.loader.epoch_batches)
        return max(1, self.split.samples["train"] // (self.loader.batch_size * self._world()[1]))

    def transform(self, train: bool) -> PatchTransform:
        """The training or evaluation patch transform of this fold."""
        if train not in self._transforms:
            self._transforms[train] = build_transform(asdict(self.loader), self.stats, train=train)
        return self._transforms[train]

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, ...], dataloader_idx: int) -> tuple[torch.Tensor, ...]:
        """Crop, flip and normalise uint8 patches where the model runs (the GPU, when there is one); feature
        vectors (with an encoder) pass as they are.

        Loader workers ship uint8 patches: a third of the bytes of float crops, and passing batches
        between processes, not reading the shards, was what capped a loader with workers.
        """
        if batch[0].dtype != torch.uint8:
            return batch
        train = self.trainer is not None and self.trainer.training
        return (self.transform(train)(batch[0]), *batch[1:])

    def num_workers(self) -> int:
        """data.loader.num_workers, `auto` resolved for the trainer's device and its processes on this host."""
        device, processes = "cpu", 1
        if self.trainer is not None:
            device, processes = self.trainer.strategy.root_device.type, self.trainer.num_devices
        return resolve_workers(self.loader.num_workers, "data.loader.num_workers", device, processes)

    def _webloader(self, dataset: wds.DataPipeline, workers: int) -> wds.WebLoader:
        return wds.WebLoader(dataset, batch_size=None, num_workers=workers,
                             pin_memory=self.loader.pin_memory and torch.cuda.is_available(),
                             persistent_workers=self.loader.persistent_workers and workers > 0)

    def train_dataloader(self) -> wds.WebLoader:
        """Endless shuffled training batches (x, y), cut into epochs of epoch_batches()."""
        rank, world = self._world()
        workers = self.num_workers()
        urls = self.split.train
        # repeat the list until every rank and worker has a shard, so no worker idles
        urls = urls * math.ceil(world * max(workers, 1) / len(urls))
        stream = shard_pipeline(urls, None, self.loader.batch_size, train=True,
                                rank=rank, world_size=world, shuffle_buffer=self.loader.shuffle_buffer)
        n = self.epoch_batches()
        # with_epoch ends each epoch after n batches from whichever workers deliver them, and the next
        # epoch restarts the workers' streams: a fresh shard order and buffer, drawn from RNG states that
        # a per-epoch reseed sets (workers=0 or non-persistent workers), so a resumed run repeats an
        # unbroken one. The length lets Lightning show progress and count steps.
        return self._webloader(stream, workers).with_epoch(n).with_length(n, silent=True)

    def eval_dataloader(self, role: str, with_keys: bool = False) -> wds.WebLoader | list:
        """Every patch of a role's shards once, centre-cropped, in a fixed order: (x, y) or (x, y, keys)."""
        # keys: long (B, 4) of KEY_FIELDS, for per-image voting. A role without shards gives [], which
        # Lightning takes as no loader.
        if role not in ROLES:
            raise ValueError(f"role={role!r}: expected one of {ROLES}")
        urls = getattr(self.split, role)
        if not urls:
            return []
        rank, world = self._world()
        if len(urls) < world:  # a rank without shards would miss the epoch-end metric sync
            rank, world = 0, 1
        # a worker beyond the shard count would only start and stop
        workers = min(self.num_workers(), math.ceil(len(urls) / world))
        dataset = shard_pipeline(urls, None,
                                 self.loader.eval_batch_size or self.loader.batch_size, train=False,
                                 rank=rank, world_size=world, with_keys=with_keys)
        return self._webloader(dataset, workers)

    def val_dataloader(self) -> wds.WebLoader | list:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> wds.WebLoader | list:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> wds.WebLoader | list:
        """The held-out fold with sample keys: (x, y, keys) for per-image voting."""
        return self.eval_dataloader("test", with_keys=True)

    def state_dict(self) -> dict[str, Any]:
        """What prediction needs to rebuild the evaluation transform, saved in every checkpoint."""
        if self.prepared is None:
            return {}
        state = {"classes": list(self.classes), "fold": self.fold, "loader": asdict(self.loader),
                 "stats": {k: torch.as_tensor(v) for k, v in self.stats.items()}, "stain": self.prepared.stain}
        if self.features is not None:  # what prediction checks before it runs the encoder again
            state["encoder"] = {"dim": self.features.dim, "weights_sha256": self.features.record["weights_sha256"],
                                "embeddings": str(self.features.path)}
        return state
