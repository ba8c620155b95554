"""The prepared, fold-aligned shards of one held-out fold as Lightning's training, validation and test loaders.

An epoch is `epoch_batches` batches of a rank's workers together, the same number on every rank (ranks with
unequal batch counts hang DDP). Evaluation under DDP: each rank takes its share of the shards (ranks then see
different numbers of batches: log metrics with torchmetrics objects, which sync once at epoch end, never with
per-step sync_dist); with fewer shards than ranks every rank evaluates all of them, which repeats samples but
leaves no rank empty. The batches themselves come from data/pipeline.py; with data.loader.device_prefetch (auto: on
a CUDA device, each rank's own) they reach Lightning already on the device, each copied while the step before it
runs (data/device_prefetch.py).

The data know no model: a pretrained net's input settings arrive as `preprocess`, and a frozen encoder as `embed`,
a callable that turns the prepared patches into feature shards (histoflow.features.embeddings.Embedder).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any, Callable, Mapping

import numpy as np
import pytorch_lightning as L
import torch
import webdataset as wds

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError
from histoflow.common.machine import resolve_workers
from histoflow.data.dataset import PreparedDataset, Split
from histoflow.data.device_prefetch import DevicePrefetcher
from histoflow.data.loader_config import LoaderConfig
from histoflow.data.pipeline import shard_pipeline
from histoflow.data.prepare import prepare_dataset
from histoflow.data.transforms import PatchTransform, build_transform

ROLES = ("train", "val", "test")
# embed(prepared, loader) -> the features of the prepared patches: an object with .split(fold), .dim, .path and
# .record (histoflow.features.embeddings.EmbeddedDataset), made once and found afterwards
Embed = Callable[[PreparedDataset, LoaderConfig], Any]


class ShardDataModule(L.LightningDataModule):
    """Prepared shards of one held-out fold as Lightning loaders; built from the whole `data` config.

    preprocess: data.loader values the model's input asks for (models.Preprocess.loader(): a pretrained net's or
    frozen encoder's resize, normalize=fixed with its mean and std). embed: with a frozen encoder, makes (once) and
    finds the encoder's features of the prepared patches; the samples are then feature vectors, for a head.
    """

    def __init__(self, fold: int | str = 1, preprocess: Mapping[str, Any] | None = None, embed: Embed | None = None,
                 **data: Any) -> None:
        super().__init__()
        self.data: dict[str, Any] = {k: to_builtin(v) for k, v in data.items()}
        self.fold = str(fold)
        self.loader = LoaderConfig.from_config(self.data.get("loader"))
        if preprocess:
            self.loader = replace(self.loader, **to_builtin(preprocess))
        self.embed = embed
        self.prepared: PreparedDataset | None = None
        self.features: Any = None  # the embed callable's result, with an encoder
        self.feature_dim: int | None = None  # the encoder's feature width, with an encoder
        self._transforms: dict[bool, PatchTransform] = {}

    def embeddings(self, prepared: PreparedDataset) -> Any:
        """The encoder's features of the prepared patches: found, or made (resumed) now."""
        if self.embed is None:
            raise ConfigError("no encoder: the samples are the patches themselves. Fix: add encoder=<name>")
        return self.embed(prepared, self.loader)

    def prepare_data(self) -> None:
        """Prepare the shards once, and embed them when there is an encoder (Lightning calls this on one process
        per node)."""
        prepared = prepare_dataset(self.data)
        if self.embed is not None:
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
            if self.embed is not None:
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
        between processes, not reading the shards, was what capped a loader with workers. With device_prefetch the
        batch was copied on a side stream; the transform still runs here, on the step's stream.
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

    def _on_device(self, loader: wds.WebLoader) -> wds.WebLoader | DevicePrefetcher:
        """The loader, its batches copied to this rank's device one step ahead where data.loader.device_prefetch
        says so (auto: on a CUDA device). Without a trainer the device is the CPU."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return DevicePrefetcher(loader, device) if self.loader.prefetches(device.type) else loader

    def train_dataloader(self) -> wds.WebLoader | DevicePrefetcher:
        """Endless shuffled training batches (x, y), cut into epochs of epoch_batches() (on the device one step
        ahead with device_prefetch)."""
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
        return self._on_device(self._webloader(stream, workers).with_epoch(n).with_length(n, silent=True))

    def eval_dataloader(self, role: str, with_keys: bool = False) -> wds.WebLoader | DevicePrefetcher | list:
        """Every patch of a role's shards once, centre-cropped, in a fixed order: (x, y) or (x, y, keys) (on the
        device one step ahead with device_prefetch)."""
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
        return self._on_device(self._webloader(dataset, workers))

    def val_dataloader(self) -> wds.WebLoader | DevicePrefetcher | list:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> wds.WebLoader | DevicePrefetcher | list:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> wds.WebLoader | DevicePrefetcher | list:
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
