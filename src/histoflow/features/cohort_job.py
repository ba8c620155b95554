"""What a cohort's embedding is asked and what it did: its config sections (`slide`, `embed` of embed.yaml), the
settings that key its features folder, the job every process gets, and each process's result (docs/cohorts.md).

    <embed.out>/<encoder>-<settings key>/   one folder per encoder (name, config, weights' sha256) and tiling
        settings.json                       (slide.mpp, tile_size, stride, tissue mask): what the key hashes
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from histoflow.common.config import read_section
from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.data.problems import Problem
from histoflow.data.transforms import PatchTransform
from histoflow.features.embeddings import encoder_settings
from histoflow.models import model_preprocess
from histoflow.slides.slide import SlideError
from histoflow.slides.table import SlideRecord
from histoflow.slides.tiling import TILING_KEYS, TilingConfig

# the cohort index's own columns (features/cohort_index.py); a slide table's column of one of these names is kept as
# table_<name>, never over the index's value
INDEX_COLUMNS = ["slide", "patient", "label", "tiles", "shard", "seconds", "sha256"]
OWN = (*INDEX_COLUMNS, "row")  # and the row, which orders the index
log = logging.getLogger(__name__)
# the tiling keys that decide which tiles a slide gives and their pixels (the backend only reads them)
DECIDING = tuple(k for k in TILING_KEYS if k != "backend")
# a cohort's tile side where slide.tile_size is null: 224 px, the side ImageNet and pathology encoders are trained
# at (112 microns at slide.mpp=0.5, as NCT-CRC-HE-100K's patches); tiles are then resized to the encoder's input side
ENCODER_SIDE = 224


class NoMppError(SlideError):
    """The slide's file gives no microns per pixel and slide.source_mpp gives none either."""


class CohortSlideError(HistoflowError):
    """A slide of the cohort that cannot be embedded, under on_bad_image=error: the run stops naming it."""


@dataclass
class CohortSlideConfig(TilingConfig):
    """How each slide is tiled (slides.tiling.TilingConfig, conf/slide/default.yaml) and how fast it is read: the
    `slide` section of embed.yaml, `data.slide` of data=slides."""

    batch_size: int = 64  # tiles per forward pass
    num_workers: int | str = "auto"  # processes decoding tiles beside the encoder; auto: the CPUs per device less one,
    #                                  at least 1 (on a CPU too: decoding is small beside an encoder's forward)
    progress: bool = True  # bars over slides and tiles with tiles/s (rank 0)
    decode: str = "auto"  # where stored JPEG tiles are decoded: auto (the GPU where the encoder runs on one) | cpu |
    #                       device (slides/jpeg_tiles.py); pace only, the same tiles either way

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CohortSlideConfig:
        return read_section(cls, cfg, "slide")

    @property
    def side(self) -> int:
        """The tile side read: slide.tile_size, or ENCODER_SIDE where null."""
        return self.tile_side(ENCODER_SIDE)


@dataclass
class CohortRunConfig:
    """Where the features go and how the work is shared out (the `embed` section of embed.yaml)."""

    out: str = "data/slide_features"  # the features folder (one sub-folder per encoder and settings)
    name: str | None = None  # the cohort's name (its index and problems files); null: the table's file name
    chunk: str | None = None  # i/n: this job embeds the i-th of n chunks of the table (a sweep: 1/4,2/4,3/4,4/4)
    accelerator: str = "auto"  # auto | cpu | gpu (Lightning Fabric's)
    devices: int = 1  # processes (devices) on this machine, each embedding its own slides
    num_nodes: int = 1  # machines of one job (SLURM starts one task per device)
    strategy: str = "ddp"  # several devices: ddp (processes started like this one) | ddp_spawn | ddp_fork

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CohortRunConfig:
        return read_section(cls, cfg, "embed")


@dataclass
class CohortJob:
    """What one process embeds: the table's slides it owns and everything needed to embed them (picklable, for the
    processes Lightning starts)."""

    records: list[tuple[int, SlideRecord]]  # (table row index, record) of this chunk, all ranks
    chunk: tuple[int, int]
    slide: CohortSlideConfig
    run: CohortRunConfig
    encoder: dict
    settings: dict
    folder: Path
    name: str
    table_sha: str
    on_bad_image: str = "error"
    table: Path | None = None  # the slide table (recorded beside the index)


@dataclass
class CohortResult:
    """What a process did: its slides embedded, reused and left out; its pace; the index once complete."""

    folder: Path
    embedded: list[str] = field(default_factory=list)  # slides (as the table writes them) embedded by this process
    reused: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    tiles: int = 0  # tiles embedded here
    seconds: float = 0.0  # wall time of the slide loop
    waiting: float = 0.0  # of which the encoder waited for tiles
    index: Path | None = None  # the cohort index, where this process completed it
    rank: int = 0
    chunk: dict[str, int] = field(default_factory=dict)  # rank 0: slides embedded, reused, left out and tiles
    #                                                      embedded by every rank of this job

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / max(self.seconds, 1e-9)

    @property
    def wait_share(self) -> float:
        return self.waiting / max(self.seconds, 1e-9)


def index_columns(extra: Mapping[str, str]) -> dict[str, str]:
    """A slide table's other columns as the index keeps them: one named like an index column as table_<name>."""
    return {f"table_{k}" if k in OWN else k: v for k, v in extra.items()}


def encoder_input(encoder_cfg: Mapping[str, Any], tile_size: int) -> tuple[int, PatchTransform, dict]:
    """The encoder's input side (its preprocess.input_size, else the tile size), the transform of uint8 tiles into
    it (its own mean and std) and the input settings that decide the vectors."""
    pre = model_preprocess(encoder_cfg, "encoder")
    if pre is None or pre.mean is None:
        raise ConfigError("the encoder has no input normalisation (encoder.preprocess.mean and std): a cohort's "
                          "features must not depend on the cohort. Fix: give encoder.preprocess.mean and std (timm "
                          "encoders take theirs with `auto`; ImageNet's: [0.485, 0.456, 0.406] and "
                          "[0.229, 0.224, 0.225])")
    side = pre.input_size or tile_size
    # tiles come at the input side already (read and resized by the slide reader): only the normalisation is left
    transform = PatchTransform(crop=None, stats={"mean_image": np.zeros((side, side, 3), np.float32)},
                               normalize="fixed", mean=pre.mean, std=pre.std)
    return side, transform, {"side": side, "mean": list(pre.mean), "std": list(pre.std)}


def cohort_settings(encoder_cfg: Mapping[str, Any], slide: CohortSlideConfig, out: Path) -> tuple[dict, Path]:
    """What decides a cohort's vectors besides each slide's content: the encoder (config, weights' sha256), its input
    and the tiling (tile_size as read: a null one and its value name the same folder); and the folder they name,
    <out>/<encoder name>-<12 hex digits of their sha256>."""
    side, _, inputs = encoder_input(encoder_cfg, slide.side)
    settings = encoder_settings(encoder_cfg, inputs, out)
    tiling = {k: getattr(slide, k) for k in DECIDING} | {"tile_size": slide.side}
    settings = {**settings, "kind": "slides", "slide": tiling}
    if slide.mpp is not None:
        settings["slide"]["level"] = None  # ignored when mpp is set
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    encoder = settings["encoder"]
    name = "".join(c if c.isalnum() or c in "_." else "_" for c in str(encoder.get("name") or "encoder")).strip("_")
    if side != slide.side:  # said in settings.json, after the key: the key has the encoder's input and the tile side
        settings["input"] = {**settings["input"], "resize": side}
    return settings, out / f"{name}-{digest}"


def say_resize(encoder_cfg: Mapping[str, Any], slide: CohortSlideConfig) -> None:
    """A warning where the encoder's input side is not the tile side: each tile is resized, and the encoder sees
    coarser (or finer) microns per pixel than slide.mpp says."""
    side = encoder_input(encoder_cfg, slide.side)[0]
    if side == slide.side:
        return
    how = "shrunk" if side < slide.side else "enlarged"
    sees = (f"{slide.mpp * slide.side / side:.3g} µm/px, not slide.mpp={slide.mpp:g}" if slide.mpp is not None
            else f"level {slide.level or 0} at {slide.side / side:.3g} times its pixel size")
    log.warning("the encoder takes %d-px input: each %d-px tile is %s to %d px, so the encoder sees %s. Fix: "
                "encoder.preprocess.input_size=%d (tiles as read), or slide.tile_size=%d (tiles of the encoder's "
                "side)", side, slide.side, how, side, sees, slide.side, side)
