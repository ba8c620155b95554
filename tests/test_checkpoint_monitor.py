"""The checkpoint a run tests: the best epoch by `monitor`, or, with callbacks.model_checkpoint.monitor=null, the
last epoch (last.ckpt), whatever monitor_mode is; two checkpoint callbacks Lightning cannot tell apart are refused
naming their config keys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train, make_images
from hydra.utils import instantiate
from pytorch_lightning.callbacks import ModelCheckpoint
from test_train import tiny_overrides

from histoflow.common.errors import ConfigError
from histoflow.training.callbacks import refuse_shared_state, without_unranked_best
from histoflow.training.run import train

pytestmark = pytest.mark.usefixtures("leave_no_trace")


def callbacks_of(overrides: list[str], tmp_path: Path) -> dict[str, pl.Callback]:
    cfg = compose_train(overrides, tmp_path)
    return {name: instantiate(c) for name, c in cfg.callbacks.items()}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_an_unmonitored_best_checkpoint_leaves_the_last_one_to_be_tested(mode: str, tmp_path: Path) -> None:
    named = without_unranked_best(callbacks_of(["callbacks.model_checkpoint.monitor=null", f"monitor_mode={mode}"],
                                               tmp_path))
    assert "model_checkpoint" not in named and named["last_checkpoint"].filename == "last"
    refuse_shared_state(named)
    trainer = pl.Trainer(callbacks=list(named.values()), logger=False, accelerator="cpu")  # Lightning accepts them
    assert trainer.checkpoint_callback is named["last_checkpoint"]


@pytest.mark.parametrize("overrides", [
    ["monitor=val/loss", "monitor_mode=min"],  # a monitored best checkpoint is kept, whatever its mode
    ["monitor=val/f1_macro", "monitor_mode=max", "callbacks=early_stopping"],
    ["callbacks.model_checkpoint.monitor=null", "~callbacks.last_checkpoint"],  # the only one keeping the last epoch
    ["callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1"],  # every epoch kept
])
def test_a_best_checkpoint_with_a_role_of_its_own_is_kept(overrides: list[str], tmp_path: Path) -> None:
    callbacks = callbacks_of(overrides, tmp_path)
    named = without_unranked_best(callbacks)
    assert named == callbacks
    refuse_shared_state(named)
    pl.Trainer(callbacks=list(named.values()), logger=False, accelerator="cpu")


def test_two_checkpoints_with_one_state_key_are_refused_naming_both(tmp_path: Path) -> None:
    # every epoch kept, unmonitored, in the last checkpoint's mode: the two would save their state under one key
    named = without_unranked_best(callbacks_of(["callbacks.model_checkpoint.monitor=null", "monitor_mode=min",
                                                "callbacks.model_checkpoint.save_top_k=-1"], tmp_path))
    assert isinstance(named["model_checkpoint"], ModelCheckpoint)
    with pytest.raises(ConfigError, match=r"callbacks\.model_checkpoint and callbacks\.last_checkpoint .*Fix:"):
        refuse_shared_state(named)


def test_training_without_a_monitor_tests_the_last_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """monitor_mode=min (the last checkpoint's mode) made the Trainer refuse to start: one state_key for both."""
    make_images(tmp_path / "images", per_class=10, size=(100, 68), pixels="tint", digits=3)
    overrides = [*tiny_overrides(tmp_path), "callbacks.model_checkpoint.monitor=null", "monitor=val/loss",
                 "monitor_mode=min", "logger=csv", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    with caplog.at_level(logging.INFO, logger="histoflow.training.callbacks"):
        metrics = train(compose_train(overrides, tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert Path(metrics["best_checkpoint"]) == last
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # the last epoch, written once
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4  # after both epochs
    assert "test/acc_macro" in metrics and metrics["val/loss_best"] == metrics["val/loss"]
    assert sum("monitor is null" in r.getMessage() for r in caplog.records) == 1
