"""One slide interface, whatever reads the file: levels and their downsamples, microns per pixel, a region at a
level, a thumbnail, the associated images (label, macro). The tissue mask, tiles, shards and slide prediction read
through it; `open_slide` (slides/backend.py) picks the backend:

- `openslide` (openslide-python with openslide-bin: OpenSlide 4 as a wheel): Aperio SVS, Hamamatsu NDPI, 3DHISTECH
  MRXS, Leica SCN, Philips TIFF, Ventana BIF, DICOM, generic tiled TIFF...;
- `tifffile` (histoflow's own reader, slides/tiff_reader.py): what OpenSlide refuses, plain strip TIFFs and single
  large images, besides SVS and tiled TIFF;
- `auto` (slide.backend's default): OpenSlide where it opens the file, else tifffile, said once per slide.

A slide's microns per pixel: a slide table's `mpp` for that slide where given (it wins: the user said so of that
one slide), else the file's (OpenSlide's properties, the TIFF resolution tags), else `source_mpp` (slide.source_mpp,
for slides whose file does not say; never over what a file says), and a request in microns without any fails
naming the slide.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable

import numpy as np
from PIL import Image

from histoflow.common.errors import ConfigError, HistoflowError, MissingInputError

BAND_PIXELS = 1 << 22  # source pixels read at a time while shrinking a whole level to a thumbnail (12 MB RGB)
MAX_UPSAMPLING = 0.9  # slide.mpp may be this much finer than the scan (0.5 on a 0.55 scan), no finer
# the kinds of slide problem (problems.csv's `kind`) and the fix of each, for the error that ends a run (predict's;
# a cohort lists the same kinds in its problems.csv)
SLIDE_FIXES = {
    "damaged-tiles": "re-copy or re-export the damaged slides",
    "unreadable": "re-copy or re-export the unreadable slides (or convert them to pyramidal TIFF)",
    "no-tissue": "check those slides, or lower slide.min_tissue or slide.tissue_threshold",
    "setting": "change the slide setting each line names (slide.level, slide.mpp, slide.tile_size)",
    "no-mpp": "give the scan's resolution: slide.source_mpp=<microns per pixel> (0.25 at 40x, 0.5 at 20x)",
}


class SlideError(HistoflowError, ValueError):
    """The file is not a slide histoflow can read, or lacks what was asked of it."""


class SlideSettingError(SlideError):
    """A setting this slide cannot honour (a level it lacks, a resolution it cannot give): the file is fine."""


@dataclass(frozen=True, order=True)
class DamagedTile:
    """A stored tile (or strip) of a slide whose bytes do not decode."""

    level: int  # pyramid level; -1: the stored thumbnail
    row: int  # its row and column among the level's stored tiles
    col: int
    x: int  # its top-left pixel at that level
    y: int
    reason: str  # what the decoder said

    def __str__(self) -> str:
        where = "the stored thumbnail" if self.level < 0 else f"level {self.level}"
        return f"{where}, stored tile row {self.row} col {self.col} (pixel x {self.x}, y {self.y}): {self.reason}"


class DamagedTileError(SlideError):
    """Stored tiles of a slide do not decode; `tiles` lists them."""

    def __init__(self, path: str | os.PathLike[str], tiles: list[DamagedTile]) -> None:
        self.path, self.tiles = Path(path), tiles
        more = f" (and {len(tiles) - 1} more damaged tiles)" if len(tiles) > 1 else ""
        super().__init__(f"{self.path}: {tiles[0]}{more}. Fix: re-export the slide or copy it again; "
                         "on_bad_image=skip: predict maps the rest of it without those tiles, embed and "
                         "data=slides leave the slide out")


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float


class Slide(ABC):
    """A whole-slide image opened for region reads; use as a context manager. Backends set `levels` and implement
    the reads; the geometry (levels for a downsample or a resolution) is the same for all."""

    backend = ""
    levels: list[Level]

    def __init__(self, path: str | os.PathLike[str], source_mpp: float | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MissingInputError(f"{self.path}: no such slide file; check the path (and HISTOFLOW_DATA)")
        if source_mpp is not None and not source_mpp > 0:
            raise ConfigError(f"slide.source_mpp={source_mpp}: microns per pixel must be positive, e.g. 0.25 (40x)")
        self.source_mpp = source_mpp
        self.stated_mpp: float | None = None  # the slide table's `mpp` for this slide (open_slide's `mpp`): wins

    # --- pixels, by each backend ----------------------------------------------------------

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 of `size` (width, height) pixels at `level` from level-0 `location`; outside the slide is
        white. Stored tiles that do not decode raise DamagedTileError naming them."""

    @abstractmethod
    def thumbnail(self, max_size: int = 1024, damaged: list[DamagedTile] | None = None) -> np.ndarray:
        """(H, W, 3) uint8 of the whole slide, its longer side at most `max_size`. With a `damaged` list, stored
        tiles that do not decode are left white (no tissue there) and listed in it, instead of raising."""

    @abstractmethod
    def associated_images(self) -> dict[str, np.ndarray]:
        """The slide's associated images (label, macro, thumbnail...) by name, as (H, W, 3) uint8."""

    @property
    @abstractmethod
    def file_mpp(self) -> float | None:
        """Microns per pixel at level 0 as the file says, or None."""

    def close(self) -> None:
        """Close the file handles."""

    # --- geometry, the same for every backend ---------------------------------------------

    @property
    def mpp(self) -> float | None:
        """Microns per pixel at level 0: the slide table's for this slide where given, else the file's, else
        slide.source_mpp (for files that do not say), else None."""
        if self.stated_mpp is not None:
            return self.stated_mpp
        return self.file_mpp if self.file_mpp is not None else self.source_mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.levels[0].width, self.levels[0].height

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed `downsample` (OpenSlide's rule)."""
        # 1% slack: a level stored at 2221 px for 4443 / 2 has downsample 2.0005 but serves 2x
        fits = [i for i, lv in enumerate(self.levels) if lv.downsample <= downsample * 1.01]
        return max(fits, default=0)

    def level_for_mpp(self, mpp: float) -> tuple[int, float]:
        """The level to read for `mpp` and the factor to resize by: read size*factor pixels, resize to size."""
        if self.mpp is None:
            raise SlideSettingError(f"{self.path}: no microns per pixel in the file, so slide.mpp={mpp} cannot be "
                                    "read. Fix: slide.source_mpp=<the scan's microns per pixel> (e.g. 0.25 at 40x), "
                                    "or slide.mpp=null to read slide.level's pixels as stored (and slide.tile_size)")
        if mpp < self.mpp * MAX_UPSAMPLING:
            raise SlideSettingError(f"{self.path}: slide.mpp={mpp} is finer than the slide was scanned ({self.mpp:.3f} "
                                    f"microns per pixel at level 0): its tiles would be blown-up pixels. Fix: "
                                    f"slide.mpp={self.mpp:.2f} or coarser")
        downsample = mpp / self.mpp
        level = self.best_level_for_downsample(downsample)
        return level, downsample / self.levels[level].downsample

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, "
                f"levels={len(self.levels)})")


def read_around_damage(read: Callable[[int, int, int, int], np.ndarray], x: int, y: int, width: int, height: int,
                       damaged: list[DamagedTile], piece: int = 256) -> np.ndarray:
    """read(x, y, width, height) of a block; where stored tiles under it do not decode, the block read again in
    `piece`-px squares, those that fail left white and their stored tiles added to `damaged`."""
    try:
        return read(x, y, width, height)
    except DamagedTileError:
        out = np.full((height, width, 3), 255, np.uint8)
    for top in range(0, height, piece):
        for left in range(0, width, piece):
            w, h = min(piece, width - left), min(piece, height - top)
            try:
                out[top:top + h, left:left + w] = read(x + left, y + top, w, h)
            except DamagedTileError as e:
                damaged += [tile for tile in e.tiles if tile not in damaged]
    return out


def shrink_by_bands(read: Callable[[int, int, int, int], np.ndarray], src_w: int, src_h: int, width: int,
                    height: int, damaged: list[DamagedTile] | None = None) -> np.ndarray:
    """A whole (src_h, src_w) image area-averaged to (height, width), reading a band of its rows at a time
    (read(x, y, w, h) -> (h, w, 3) uint8), so memory is bounded by the band, not the level. With a `damaged` list,
    stored tiles that do not decode are left white and listed there (read_around_damage) instead of raising."""

    def read_rows(row: int, rows: int) -> np.ndarray:
        if damaged is None:
            return read(0, row, src_w, rows)
        return read_around_damage(read, 0, row, src_w, rows, damaged)

    if (src_w, src_h) == (width, height):
        return read_rows(0, src_h)
    step = src_h / height
    band = max(1, int(BAND_PIXELS / (src_w * step)))  # output rows per band
    out = np.empty((height, width, 3), np.uint8)
    for o0 in range(0, height, band):
        o1 = min(height, o0 + band)
        fy0, fy1 = o0 * step, o1 * step
        r0, r1 = math.floor(fy0), min(src_h, math.ceil(fy1))
        block = Image.fromarray(read_rows(r0, r1 - r0))
        # BOX with a fractional source box averages exactly each output pixel's footprint, so bands join seamlessly
        box = (0, fy0 - r0, src_w, fy1 - r0)
        out[o0:o1] = np.asarray(block.resize((width, o1 - o0), Image.Resampling.BOX, box=box))
    return out
