"""Shared fixtures: the real data under ../shared/data (or $HISTOFLOW_DATA), skipped when absent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Where the real test data lives: $HISTOFLOW_DATA, else ../shared/data beside the clone."""
    return Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data")).resolve()


def _require(sub: str) -> Path:
    path = shared_data_dir() / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent: set HISTOFLOW_DATA to the folder holding '{sub}/'")
    return path


@pytest.fixture(scope="session")
def lymphoma_dir() -> Path:
    return _require("lymphoma")


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    return _require("wsi")


@pytest.fixture(scope="session")
def kather_dir() -> Path:
    return _require("kather2016-sample")


# ---------------------------------------------------------------- tiny class folders

CLASSES = ["CLL", "FL", "MCL"]


def make_images(root: Path, per_class: int = 6, size: tuple[int, int] = (80, 64), seed: int = 0) -> Path:
    """Random RGB PNGs in one folder per class (distinct bytes, so no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{c}-{i}.png")
    return root


def config(root: Path, out: Path, **over) -> dict:
    """A plain data config for make_images' folders (3 folds, 36-px patches), prepared into `out`."""
    data = {"name": "tiny", "root": str(root), "classes": CLASSES, "labels": "folder",
            "split": {"kind": "kfold", "k": 3, "val_fraction": 0.5, "seed": 0},
            "patches": {"size": 36, "stride": 32, "rotations": [0, 90]},
            "shards": {"dir": str(out), "samples_per_shard": 40, "workers": 1}}
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return data


# ---------------------------------------------------------------- training runs


@pytest.fixture()
def leave_no_trace(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that call train(): it sets WANDB_* variables and Hydra's run config; put both back."""
    for name in ("WANDB_MODE", "WANDB_SILENT", "WANDB_CONSOLE", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # monkeypatch restores them as they were
    yield
    HydraConfig.instance().cfg = None  # else Lightning would think a later test runs under Hydra


def compose_train(overrides: list[str], output_dir: Path, multirun: bool = False) -> DictConfig:
    """The real train.yaml with overrides, as @hydra.main would give it to train() (hydra node removed);
    multirun: as to a job of a sweep, whose folder is output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        HydraConfig().set_config(cfg)  # ${hydra:...} resolves as in a real run
        del cfg["hydra"]
    return cfg


def env_without_wandb_account(tmp: Path) -> dict[str, str]:
    """This environment for a child process with no W&B key, mode or netrc (W&B must decide offline by itself),
    unbuffered, one thread (tiny nets gain nothing from threads, and a shared CPU makes them wait)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "NETRC": str(tmp / "no-netrc"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- figures


@pytest.fixture()
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib Figure saved while the test runs (savefig still writes the file), to read what was drawn."""
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    savefig = Figure.savefig

    def recording(self: Figure, *args: object, **kwargs: object) -> object:
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


def plotted_lines(figure) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{axes title: {line label: (x values, y values)}} of a figure's labelled lines."""
    return {ax.get_title(): {line.get_label(): ([float(x) for x in line.get_xdata()],
                                                [float(y) for y in line.get_ydata()])
                             for line in ax.lines if not line.get_label().startswith("_")}
            for ax in figure.axes}
