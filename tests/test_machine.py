"""Worker counts chosen from the machine (num_workers: auto)."""

from __future__ import annotations

import pytest

from histoflow.common.errors import ConfigError
from histoflow.common.machine import auto_workers, resolve_workers
from histoflow.data.datamodule import ShardDataModule
from histoflow.data.loader_config import LoaderConfig


def test_auto_reads_in_process_on_a_cpu_and_keeps_workers_beside_a_gpu() -> None:
    assert auto_workers("cpu", cpus=64) == 0  # the net's step uses every core; reading costs 1/40 of it
    assert auto_workers("cuda", processes=1, cpus=16) == 8  # capped
    assert auto_workers("cuda", processes=4, cpus=16) == 3  # one CPU per device's process kept for itself
    assert auto_workers("cuda", processes=2, cpus=2) == 0


@pytest.mark.parametrize("value", [-1, "many", 1.5, True])
def test_other_settings_are_refused_by_key(value) -> None:
    with pytest.raises(ConfigError, match="slide.num_workers"):
        resolve_workers(value, "slide.num_workers", "cpu")


def test_the_datamodule_resolves_auto_without_a_trainer_as_a_cpu() -> None:
    assert LoaderConfig().num_workers == "auto"
    assert ShardDataModule(loader={"num_workers": "auto"}).num_workers() == 0
    assert ShardDataModule(loader={"num_workers": 3}).num_workers() == 3
