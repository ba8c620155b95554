"""Lightning callbacks and plugins that the library does not ship: per-epoch seeding, channels_last weights,
flushed logs, and checkpoints written atomically; and the checkpoint callbacks of a run without a redundant one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from histoflow.common.errors import ConfigError

log = logging.getLogger(__name__)


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


def _schedule(checkpoint: ModelCheckpoint) -> tuple[object, ...]:
    """When a checkpoint callback saves: every n epochs, every n training steps, every time interval."""
    return checkpoint._every_n_epochs, checkpoint._every_n_train_steps, checkpoint._train_time_interval


def without_unranked_best(callbacks: dict[str, Callback]) -> dict[str, Callback]:
    """The run's callbacks (by config key) less a best-epoch checkpoint that ranks nothing.

    The first ModelCheckpoint is the one tested after fit (Lightning's trainer.checkpoint_callback; the best epoch by
    `monitor`: callbacks.model_checkpoint). With its monitor null it ranks no epochs and keeps the latest, as
    callbacks.last_checkpoint (last.ckpt, monitor null) does already: the same weights written twice an epoch, and
    two callbacks that Lightning refuses when their modes are equal (one state_key). It is left out, so the last
    checkpoint is the one tested and the one test_metrics.json names (what predict.py loads). Kept where nothing else
    keeps the latest epoch on its schedule, or where it keeps more than one (save_top_k other than 1)."""
    checkpoints = [(name, c) for name, c in callbacks.items() if isinstance(c, ModelCheckpoint)]
    if not checkpoints or checkpoints[0][1].monitor is not None or checkpoints[0][1].save_top_k != 1:
        return callbacks
    best_name, best = checkpoints[0]
    keeper = next((name for name, c in checkpoints[1:]
                   if c.monitor is None and c.save_top_k != 0 and _schedule(c) == _schedule(best)), None)
    if keeper is None:
        return callbacks
    log.info("callbacks.%s.monitor is null: no metric ranks the epochs, so the last epoch is tested, as "
             "callbacks.%s saves it (test_metrics.json names it best_checkpoint)", best_name, keeper)
    return {name: c for name, c in callbacks.items() if name != best_name}


def refuse_shared_state(callbacks: dict[str, Callback]) -> None:
    """Refuse, naming both config keys, two callbacks whose saved state Lightning could not tell apart (one
    state_key: e.g. two checkpoints with the same monitor, mode and schedule), which the Trainer would refuse
    without naming them."""
    seen: dict[str, str] = {}
    for name, callback in callbacks.items():
        if type(callback).state_dict is Callback.state_dict:  # no state saved: Lightning does not compare it
            continue
        other = seen.setdefault(callback.state_key, name)
        if other != name:
            raise ConfigError(f"callbacks.{other} and callbacks.{name} would save their state under one key "
                              f"({callback.state_key}), which Lightning refuses. Fix: give one of them another "
                              f"monitor, mode or schedule (every_n_epochs), or remove one (~callbacks.{name})")
