"""How a slide is cut into tiles: the one tiling config of every command that tiles slides (`slide` in embed.yaml
and predict.yaml, `data.slide` under data=slides; all three compose conf/slide/default.yaml), so a slide is tiled
the same way for embedding, training and prediction unless a key says otherwise (docs/cohorts.md, prediction.md).

Each command reads its `slide` section into a dataclass that adds, to these keys, only its own keys of pace and
display (batch_size, num_workers, progress; predict's device and heatmap_class):
features.cohort_job.CohortSlideConfig and deployment.slide_map.SlideConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from histoflow.common.errors import ConfigError
from histoflow.slides.backend import DEFAULT_BACKEND


@dataclass
class TilingConfig:
    """Which tiles a slide gives and their pixels (conf/slide/default.yaml)."""

    backend: str = DEFAULT_BACKEND  # auto (OpenSlide where it reads the file, else tifffile) | openslide | tifffile
    source_mpp: float | None = None  # the scan's microns per pixel, for slides whose file does not say
    tile_size: int | None = None  # tile side in pixels at `mpp` (or `level`); null: the model's own side (tile_side)
    level: int = 0  # pyramid level to read when mpp is null (0: full resolution)
    mpp: float | None = 0.5  # microns per pixel the tiles are read at (best level, resized): micron-true tiles
    stride: int | None = None  # grid step in the same pixels; null: the tile side (no overlap)
    min_tissue: float = 0.5  # share of a tile the tissue mask must cover
    tissue_threshold: float | None = None  # HSV saturation above which a thumbnail pixel is tissue; null: Otsu
    thumbnail_size: int = 1024  # longer side of the thumbnail the tissue mask (and predict's heatmap) is drawn on

    def __post_init__(self) -> None:
        wrong = []
        if self.tile_size is not None and self.tile_size < 1:
            wrong.append(f"slide.tile_size={self.tile_size}: a tile is at least 1 px. Fix: slide.tile_size=224, or "
                         "null for the model's own side")
        if self.stride is not None and self.stride < 1:
            wrong.append(f"slide.stride={self.stride}: the grid must step at least 1 px. Fix: slide.stride=null (the "
                         "tile side: no overlap) or a positive number of pixels")
        if not 0 <= self.min_tissue <= 1:
            wrong.append(f"slide.min_tissue={self.min_tissue}: a share of the tile, from 0 to 1. Fix: e.g. "
                         "slide.min_tissue=0.5")
        if self.mpp is not None and self.level != 0:  # one of the two decides: say so rather than ignore level
            wrong.append(f"slide.level={self.level} with slide.mpp={self.mpp}: a resolution in microns chooses the "
                         f"level itself. Fix: slide.mpp=null to read level {self.level}, or leave slide.level at 0")
        if wrong:
            raise ConfigError("; ".join(wrong))

    def tile_side(self, model_side: int) -> int:
        """The tile side read (in pixels at `mpp` or `level`): tile_size, or where null the model's own side (a
        patch model: the side of its training patches; a cohort's frozen encoder: features.cohort_job.ENCODER_SIDE)."""
        return self.tile_size if self.tile_size is not None else model_side

    def tiling(self) -> dict:
        """The tiling keys alone (not a command's own keys of pace and display)."""
        return {f.name: getattr(self, f.name) for f in fields(TilingConfig)}


TILING_KEYS = tuple(f.name for f in fields(TilingConfig))
