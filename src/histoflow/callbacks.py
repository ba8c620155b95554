"""Lightning callbacks that the library does not ship: per-epoch seeding and channels_last weights."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


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
