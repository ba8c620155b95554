"""Tiles of a whole slide: their geometry at a level or resolution, and batched parallel reads.

A tile is `read_size` pixels square at a pyramid level (or `tile_size` pixels at a target mpp, read
at the best level and resized), on a grid of `read_stride`, kept where the thumbnail's tissue mask
covers at least `min_tissue` of it. Tiles are read a batch at a time (neighbours in a row as one strip), so
memory is bounded by the batch, not the slide.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from histoflow.data.pipeline import as_made
from histoflow.slides.backend import DEFAULT_BACKEND, open_slide
from histoflow.slides.jpeg_tiles import JpegLevel, StoredBatch, decode_batch, jpeg_level, wants_device
from histoflow.slides.slide import (
    DamagedTile,
    DamagedTileError,
    Slide,
    SlideError,
    SlideSettingError,
)
from histoflow.slides.tissue import tile_grid, tissue_mask

_STRIP_PIXELS = 1 << 24  # level pixels read at once for a run of neighbouring tiles (48 MB RGB)


class NoTissueError(SlideError):
    """No tile of the slide holds enough tissue; the message names the slide and the fix."""


@dataclass(frozen=True)
class TileGeometry:
    """Where tiles are read: `read_size` px every `read_stride` px at `level`, each resized to `tile_size`."""

    level: int
    downsample: float  # of `level` from level 0
    read_size: int  # tile side read at `level`, pixels
    read_stride: int  # grid step at `level`, pixels
    tile_size: int  # tile side handed on (to the model or the shard), pixels
    rows: int  # grid rows and columns over the whole level (tissue or not)
    cols: int

    @classmethod
    def of(cls, slide: Slide, size: int, level: int = 0, mpp: float | None = None, stride: int | None = None,
           out_size: int | None = None) -> TileGeometry:
        """Tiles of `size` px every `stride` (default `size`) px at `level`, or at `mpp` when given; handed on
        resized to `out_size` px (default `size`)."""
        if size <= 0 or (stride is not None and stride <= 0) or (out_size is not None and out_size <= 0):
            raise ValueError(f"tile size, stride and output size must be positive, got {size}, {stride}, {out_size}")
        factor = 1.0
        if mpp is not None:
            level, factor = slide.level_for_mpp(mpp)  # read factor x more pixels at `level`, then resize
        elif not 0 <= level < len(slide.levels):
            raise SlideSettingError(f"{slide.path}: slide.level={level} does not exist (the slide has "
                                    f"{len(slide.levels)}: {[(lv.width, lv.height) for lv in slide.levels]}). Fix: "
                                    f"slide.level={len(slide.levels) - 1} or lower, or slide.mpp=<microns per pixel>")
        read_size = max(1, round(size * factor))
        read_stride = max(1, round((stride or size) * factor))
        lv = slide.levels[level]
        if read_size > min(lv.width, lv.height):
            asked = f"slide.mpp={mpp}" if mpp is not None else f"slide.level={level}"
            raise SlideSettingError(f"{slide.path}: at {asked} a tile is {read_size} px of level {level}, larger than "
                                    f"the level itself ({lv.width} x {lv.height} px): not one tile fits. Fix: a finer "
                                    "slide.mpp or lower slide.level, or a smaller slide.tile_size")
        rows = (lv.height - read_size) // read_stride + 1
        cols = (lv.width - read_size) // read_stride + 1
        return cls(level, lv.downsample, read_size, read_stride, out_size or size, rows, cols)

    def grid_index(self, origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of level-0 tile origins (N, 2) on this grid."""
        level_xy = np.rint(np.asarray(origins, np.float64) / self.downsample / self.read_stride).astype(np.int64)
        return level_xy[:, 1], level_xy[:, 0]


def tissue_tiles(slide: Slide, geometry: TileGeometry, min_tissue: float = 0.5,
                 tissue_threshold: float | None = None, thumbnail: np.ndarray | None = None) -> np.ndarray:
    """(N, 2) level-0 origins of the grid tiles with tissue; NoTissueError (naming the fix) when there are none."""
    lv = slide.levels[geometry.level]
    if geometry.rows == 0 or geometry.cols == 0:
        raise NoTissueError(f"{slide.path}: level {geometry.level} is {lv.width} x {lv.height} px, smaller than one "
                            f"{geometry.read_size}-px tile. Fix: choose a lower level (finer) or a smaller tile size")
    thumb = slide.thumbnail() if thumbnail is None else thumbnail
    mask = tissue_mask(thumb, tissue_threshold)
    origins = tile_grid(slide, geometry.read_size, geometry.level, geometry.read_stride, mask, min_tissue)
    if len(origins) == 0:
        how = "Otsu's threshold" if tissue_threshold is None else f"tissue threshold {tissue_threshold}"
        raise NoTissueError(
            f"{slide.path}: no tissue found ({how} on saturation finds {mask.mean():.1%} of the thumbnail; no "
            f"{geometry.read_size}-px tile at level {geometry.level} is {min_tissue:.0%} covered). Fix: lower the "
            "tissue threshold (slide.tissue_threshold=0.02; data.slide.tissue_threshold with data=slides) or the "
            "share of a tile that must be tissue (slide.min_tissue=0.1), or check that this is the slide")
    return origins


class SlideTiles(Dataset):
    """Batches of tiles of one slide, read (and transformed) in whichever process asks.

    Item i is (i, batch i, damaged): `damaged` maps the position in the batch of each tile over stored slide tiles
    that do not decode (that tile is left white) to those stored tiles.

    `decode` (slide.decode, slides/jpeg_tiles.py): where the level's stored tiles are JPEG and `device` decodes them,
    item i is (i, StoredBatch, {}) instead, the compressed stored tiles under batch i, which `tile_loader` decodes
    and transforms on `device`; the tiles are the same as the CPU reader's (within JPEG decoders' rounding).
    """

    def __init__(self, path: str | os.PathLike[str], origins: np.ndarray, geometry: TileGeometry, batch_size: int,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None, backend: str = DEFAULT_BACKEND,
                 source_mpp: float | None = None, decode: str = "cpu",
                 device: torch.device | str | None = None) -> None:
        self.path, self.origins, self.geometry = Path(path), np.asarray(origins, np.int64), geometry
        self.batch_size, self.transform = int(batch_size), transform
        self.backend, self.source_mpp = backend, source_mpp  # how the slide is opened (slides/backend.py)
        self._slide: Slide | None = None
        self._pid = -1
        self.device = torch.device(device or "cpu")
        self.jpeg: JpegLevel | None = None
        if wants_device(decode, self.device):
            with open_slide(self.path, backend, source_mpp) as slide:
                lv = slide.levels[geometry.level]
            self.jpeg = jpeg_level(self.path, lv.width, lv.height, decode, self.device)

    def __len__(self) -> int:
        return math.ceil(len(self.origins) / self.batch_size)

    def slide(self) -> Slide:
        """This process's own Slide: a loader worker opens its own file, not the parent's."""
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path, self.backend, self.source_mpp), os.getpid()
        return self._slide

    def read(self, origins: np.ndarray) -> np.ndarray:
        """(N, tile_size, tile_size, 3) uint8 tiles at level-0 origins (N, 2)."""
        g, slide = self.geometry, self.slide()
        out = np.empty((len(origins), g.tile_size, g.tile_size, 3), np.uint8)
        # Neighbouring tiles in a row are read as one strip, so each stored slide tile under the run is decoded
        # once rather than once per tile over it (twice as fast on 240-px JPEG 2000 tiles); strips are capped
        # at _STRIP_PIXELS to keep memory bounded for large tiles.
        level_x = np.rint(origins[:, 0] / g.downsample).astype(np.int64)  # as Slide.read_region maps them
        level_y = np.rint(origins[:, 1] / g.downsample).astype(np.int64)
        max_run = max(1, _STRIP_PIXELS // (g.read_size * g.read_size))
        start = 0
        while start < len(origins):
            end = start + 1
            while (end < len(origins) and end - start < max_run and level_y[end] == level_y[start]
                   and level_x[end] - level_x[end - 1] == g.read_stride):
                end += 1
            width = int(level_x[end - 1] - level_x[start]) + g.read_size
            x, y = (int(v) for v in origins[start])
            strip = slide.read_region((x, y), g.level, (width, g.read_size))
            for i in range(start, end):
                left = int(level_x[i] - level_x[start])
                tile = strip[:, left:left + g.read_size]
                if g.read_size != g.tile_size:
                    # BOX averages each output pixel's footprint when shrinking, as the slide's own pyramid does
                    tile = np.asarray(Image.fromarray(tile).resize((g.tile_size, g.tile_size), Image.Resampling.BOX))
                out[i] = tile
            start = end
        return out

    def read_damaged(self, origins: np.ndarray) -> tuple[np.ndarray, dict[int, list[DamagedTile]]]:
        """`read`, but where stored slide tiles do not decode, the tiles over them left white and listed by position."""
        try:
            return self.read(origins), {}
        except DamagedTileError:
            pass  # which tiles of the run: each read alone (the decoded stored tiles are cached)
        g, damaged = self.geometry, {}
        out = np.full((len(origins), g.tile_size, g.tile_size, 3), 255, np.uint8)
        for i in range(len(origins)):
            try:
                out[i] = self.read(origins[i:i + 1])[0]
            except DamagedTileError as e:
                damaged[i] = e.tiles
        return out, damaged

    def batch_origins(self, index: int) -> np.ndarray:
        return self.origins[index * self.batch_size:(index + 1) * self.batch_size]

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | torch.Tensor | StoredBatch,
                                               dict[int, list[DamagedTile]]]:
        origins = self.batch_origins(index)
        if self.jpeg is not None:  # the compressed stored tiles alone: decoded on the device (tile_loader)
            g = self.geometry
            level_xy = np.rint(origins / g.downsample).astype(np.int64)
            return index, self.jpeg.plan(level_xy[:, 0], level_xy[:, 1], g.read_size, g.tile_size), {}
        # damaged tiles come back as data: an error raised in a loader worker reaches the caller as its traceback
        tiles, damaged = self.read_damaged(origins)
        return index, tiles if self.transform is None else self.transform(tiles), damaged

    def on_device(self, index: int, batch: StoredBatch) -> tuple[torch.Tensor, dict[int, list[DamagedTile]]]:
        """Batch `index`'s tiles decoded (and transformed) on the device; where a stored tile does not decode, the
        batch read by the CPU reader instead, which names the damaged stored tiles."""
        try:
            tiles, damaged = decode_batch(batch, self.device), {}
        except RuntimeError:  # torchvision names no tile: the CPU reader finds which
            found, damaged = self.read_damaged(self.batch_origins(index))
            tiles = torch.from_numpy(found).to(self.device)
        return (tiles if self.transform is None else self.transform(tiles)), damaged

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None, "_pid": -1}  # spawned workers open the file themselves


def worker_blocks(batches: int, workers: int) -> list[int]:
    """An order of batch indices in which DataLoader worker j (given items j, j+w, ...) reads the j-th
    contiguous block of batches: each worker walks its own part of the slide top to bottom, so the
    stored tiles one grid row shares with the next are still in that worker's decoded-tile cache."""
    w = max(1, workers)
    counts = [batches // w + (j < batches % w) for j in range(w)]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    return [int(starts[i % w] + i // w) for i in range(batches)]


def stored_tiles(damaged: dict[int, list[DamagedTile]]) -> list[DamagedTile]:
    """The distinct stored slide tiles of a batch's `damaged` (neighbouring tiles often share one), sorted."""
    return sorted({t for tiles in damaged.values() for t in tiles})


def tile_loader(tiles: SlideTiles, num_workers: int = 2,
                pin_memory: bool = False) -> DataLoader | Iterator[tuple[int, torch.Tensor, dict]]:
    """Items (batch index, batch, damaged) of `tiles`, read by `num_workers` processes while the caller computes;
    with `tiles.jpeg`, the workers read the compressed stored tiles and the batch is decoded and transformed here,
    on `tiles.device` (its tensors there).

    Batches come in `worker_blocks` order (every batch exactly once, not in index order).
    """
    # Each worker holds at most 2 batches ahead: memory is bounded by workers x batch, never by the slide.
    loader = DataLoader(tiles, batch_size=None, sampler=worker_blocks(len(tiles), num_workers),
                        num_workers=num_workers, collate_fn=as_made, pin_memory=pin_memory and tiles.jpeg is None,
                        prefetch_factor=2 if num_workers else None)
    return loader if tiles.jpeg is None else _decoded_on_device(tiles, loader)


def _decoded_on_device(tiles: SlideTiles, loader: DataLoader) -> Iterator[tuple[int, torch.Tensor, dict]]:
    batches = iter(loader)  # the workers start reading now, as a DataLoader's do when iterated
    return ((index, *tiles.on_device(index, batch)) for index, batch, _ in batches)
