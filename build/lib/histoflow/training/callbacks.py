"""Lightning callbacks and plugins that the library does not ship: per-epoch seeding, channels_last weights,
flushed logs, and checkpoints written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import TorchCheckpointIO


class EpochSeed(Callback):
    """Re-seed every RNG (and the loader workers) with seed + epoch at the start of each training epoch.

    A run resumed from an end-of-epoch checkpoint then draws the same shuffles, crops and flips as
    an unbroken run: without it the resumed run would continue from seed_everything's fresh state.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called before the epoch's loader iterator is made, so the loader workers' seeds follow from this one
        # (Lightning's worker_init_fn still mixes in the worker id and the rank).
        pl.seed_everything(self.seed + trainer.current_epoch, workers=True, verbose=False)


class ChannelsLast(Callback):
    """Keep the model's weights in channels_last (NHWC) layout, which Tensor Core convolutions prefer.

    Converting the weights suffices: a convolution whose weight is channels_last returns channels_last
    activations, so the rest of the network follows without touching the batches.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


class FlushLogs(Callback):
    """Write every logger's buffered metrics at the end of each validation, before the checkpoint is saved.

    The CSV logger buffers rows and writes them every 100 steps; a run killed just after saving an epoch's
    checkpoint would resume after that epoch with its validation metrics never written. Lightning runs
    checkpoint callbacks after all others, so with this callback a checkpoint on disk implies its metrics are.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            logger.save()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file beside it, fsync it, then rename it over the old one (os.replace).

    A write that fails (a full disk) leaves the previous checkpoint whole and removes its partial file; a kill
    mid-write leaves the previous one whole too, and its partial file for the next save to overwrite.
    Lightning's own writer stages the file in the system's temp folder and moves it: across file systems (a tmpfs
    /tmp) that move is a copy, which a full disk truncates, and nothing is fsynced. Remote paths keep Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One fixed name per checkpoint (only rank 0 writes): a kill's leftover is overwritten by the next save.
        temp = path.with_name(f".{path.name}.tmp")
        try:
            with temp.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)
