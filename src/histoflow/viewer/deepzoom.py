"""Deep-zoom tiles of any slide histoflow reads: OpenSlide's `DeepZoomGenerator` arithmetic over histoflow's slide
interface (slides/slide.py), so every backend (OpenSlide, tifffile) serves the viewer, not only OpenSlide objects.

The deep-zoom pyramid halves the level-0 image down to one pixel; its level L has downsample 2^(max - L). A tile is
`tile_size` px plus `overlap` px on each side that has a neighbour; it is read from the slide level OpenSlide would
read (the largest whose downsample does not exceed the tile's: no slack, unlike Slide.best_level_for_downsample) at
the location and size OpenSlide computes (float level coordinates, level-0 location rounded down, size rounded up)
and shrunk as OpenSlide shrinks it (PIL's thumbnail, Lanczos) only where the sizes differ. So an OpenSlide-backed
slide's tiles are `openslide.deepzoom.DeepZoomGenerator`'s pixels (tests/test_view_deepzoom.py), and at a deep-zoom
level that is a slide level a tile is that level's read_region. Encoded tiles are kept in an LRU cache by bytes.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache
from PIL import Image

from histoflow.slides.slide import Slide

TILE_SIZE = 254  # OpenSlide's default: with 1 px of overlap on each side a tile is 256 px
OVERLAP = 1
CACHE_BYTES = 256 << 20  # encoded tiles kept, per slide


@dataclass(frozen=True)
class TileRead:
    """Where a deep-zoom tile comes from: `size` px (width, height) at slide `level` from level-0 `location`,
    resized to `out` px."""

    level: int
    location: tuple[int, int]
    size: tuple[int, int]
    out: tuple[int, int]


def openslide_level(slide: Slide, downsample: float) -> int:
    """The level OpenSlide's DeepZoomGenerator reads for `downsample`: the largest whose downsample does not exceed
    it (a level at 2.0005 is not read for 2x)."""
    return max((i for i, lv in enumerate(slide.levels) if lv.downsample <= downsample), default=0)


class DeepZoom:
    """The deep-zoom pyramid of an open slide: its DZI description, tile reads and encoded (cached) tiles. Reads are
    serialised by a lock (a slide handle of the tifffile backend is not shared between threads)."""

    def __init__(self, slide: Slide, tile_size: int = TILE_SIZE, overlap: int = OVERLAP, fmt: str = "jpeg",
                 quality: int = 75, cache_bytes: int = CACHE_BYTES) -> None:
        if fmt not in ("jpeg", "png"):
            raise ValueError(f"deep-zoom tile format {fmt!r}: expected jpeg or png")
        self.slide, self.tile_size, self.overlap, self.format, self.quality = slide, tile_size, overlap, fmt, quality
        size = slide.dimensions
        dims = [size]
        while max(size) > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            dims.append(size)
        self.level_dimensions: list[tuple[int, int]] = dims[::-1]  # deep-zoom level 0: 1 x 1 px
        self.level_tiles = [(math.ceil(w / tile_size), math.ceil(h / tile_size)) for w, h in self.level_dimensions]
        self._cache: LRUCache = LRUCache(cache_bytes, getsizeof=len)
        self._lock = threading.Lock()

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def dzi(self) -> dict:
        """The DZI description as OpenSeadragon takes it inline (no XML request: it works from file:// too)."""
        w, h = self.slide.dimensions
        return {"Image": {"xmlns": "http://schemas.microsoft.com/deepzoom/2008", "Format": self.format,
                          "Overlap": str(self.overlap), "TileSize": str(self.tile_size),
                          "Size": {"Width": str(w), "Height": str(h)}}}

    def dzi_xml(self) -> str:
        w, h = self.slide.dimensions
        return ('<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
                f'Format="{self.format}" Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Width="{w}" '
                f'Height="{h}"/></Image>\n')

    def tile_read(self, level: int, col: int, row: int) -> TileRead:
        """Which slide pixels make deep-zoom tile (col, row) of `level`; ValueError for a tile the pyramid lacks."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"deep-zoom level {level}: the pyramid has levels 0-{self.level_count - 1}")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"deep-zoom tile {col}_{row} of level {level}: the level has {cols} x {rows} tiles")
        z_w, z_h = self.level_dimensions[level]
        z_ds = 2.0 ** (self.level_count - 1 - level)  # this deep-zoom level's downsample from level 0
        s_level = openslide_level(self.slide, z_ds)
        lv = self.slide.levels[s_level]
        l_ds = z_ds / lv.downsample  # slide-level pixels per deep-zoom pixel
        tl = (self.overlap * (col > 0), self.overlap * (row > 0))
        br = (self.overlap * (col < cols - 1), self.overlap * (row < rows - 1))
        z_x, z_y = col * self.tile_size - tl[0], row * self.tile_size - tl[1]
        out = (min(self.tile_size, z_w - col * self.tile_size) + tl[0] + br[0],
               min(self.tile_size, z_h - row * self.tile_size) + tl[1] + br[1])
        l_x, l_y = z_x * l_ds, z_y * l_ds  # OpenSlide's DeepZoomGenerator._get_tile_info, step by step
        location = (int(lv.downsample * l_x), int(lv.downsample * l_y))
        size = (max(1, min(math.ceil(out[0] * l_ds), lv.width - math.ceil(l_x))),
                max(1, min(math.ceil(out[1] * l_ds), lv.height - math.ceil(l_y))))
        return TileRead(s_level, location, size, out)

    def tile_pixels(self, level: int, col: int, row: int) -> np.ndarray:
        """(H, W, 3) uint8 of a deep-zoom tile."""
        read = self.tile_read(level, col, row)
        with self._lock:
            pixels = self.slide.read_region(read.location, read.level, read.size)
        if read.size == read.out:
            return pixels
        image = Image.fromarray(pixels)
        image.thumbnail(read.out, Image.Resampling.LANCZOS)  # as DeepZoomGenerator.get_tile shrinks it
        return np.asarray(image)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """A deep-zoom tile encoded (JPEG or PNG), from the cache where it was made before."""
        key = (level, col, row)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        buffer = io.BytesIO()
        image = Image.fromarray(self.tile_pixels(level, col, row))
        if self.format == "jpeg":
            image.save(buffer, "JPEG", quality=self.quality)
        else:
            image.save(buffer, "PNG", compress_level=1)
        data = buffer.getvalue()
        with self._lock:
            self._cache[key] = data
        return data

    def tiles(self):
        """Every (level, col, row) of the pyramid: what a static export writes."""
        for level, (cols, rows) in enumerate(self.level_tiles):
            for row in range(rows):
                for col in range(cols):
                    yield level, col, row
