"""Resuming a run (training/resume.py, issue 37 item 3): a sweep folder resumed with another data set, slide table
or bag level is refused before any work, naming both values; the same data (a path however written) resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from histoflow.common.errors import ConfigError
from histoflow.training.resume import check_resumable

RUN = {"model": {"_target_": "histoflow.models.mil.ABMIL"}, "optimizer": {"_target_": "torch.optim.Adam"},
       "fold": 1, "data": {"name": "slides", "table": "cohort.csv"}, "bag": {"level": "slide"}}


def _checkpoint(path: Path, config: dict) -> Path:
    torch.save({"state_dict": {}, "optimizer_states": [{}],
                "hyper_parameters": {"classes": ["a", "b"], "input_size": 32, "config": config}}, path)
    return path


def _asks(**changes: dict) -> OmegaConf:
    cfg = OmegaConf.create(RUN)
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def test_another_bag_level_or_table_is_refused_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path / "last.ckpt", RUN)
    with pytest.raises(ConfigError, match=r"trained with bag.level=slide, this run asks for bag.level=patient.*"
                                          r"mix.*Fix: resume with the data it was trained on"):
        check_resumable(ckpt, _asks(bag__level="patient"))
    with pytest.raises(ConfigError, match=rf"data.table={tmp_path / 'cohort.csv'}, this run asks for "
                                          rf"data.table={tmp_path / 'other.csv'}"):
        check_resumable(ckpt, _asks(data__table="other.csv"))
    with pytest.raises(ConfigError, match="trained with data.name=slides, this run asks for data.name=lymphoma"):
        check_resumable(ckpt, _asks(data__name="lymphoma"))


def test_the_same_data_written_another_way_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted (check_resumable returns, where it refuses otherwise) though the data is written another way; the same
    checkpoint still refuses other data, so the table was compared, not passed over."""
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path / "last.ckpt", RUN)
    assert check_resumable(ckpt, _asks(data__table=str(tmp_path / "cohort.csv"))) is None  # absolute now, relative then
    with pytest.raises(ConfigError, match="data.table="):
        check_resumable(ckpt, _asks(data__table=str(tmp_path / "other" / "cohort.csv")))
    old = _checkpoint(tmp_path / "old.ckpt", {k: v for k, v in RUN.items() if k != "bag"})
    assert check_resumable(old, _asks(bag__level="image")) is None  # a checkpoint from before bag.level: no compare
    with pytest.raises(ConfigError, match="data.name="):  # the keys it has are still compared
        check_resumable(old, _asks(data__name="lymphoma"))
