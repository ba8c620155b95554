"""The OpenSlide backend of the slide interface (slides/slide.py): every format OpenSlide 4 reads (Aperio SVS,
Hamamatsu NDPI, 3DHISTECH MRXS, Leica SCN, Philips TIFF, Ventana BIF, DICOM, generic tiled TIFF...).

OpenSlide gives RGBA regions, transparent outside the slide and where nothing was scanned: composited on white
here, as the tifffile reader shows them. A read that fails leaves an OpenSlide handle in an error state for good: the
slide is opened again, and the failed region read stored tile by stored tile, so that the damaged ones are named
(and the others read) as with the tifffile reader.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

from histoflow.slides.slide import DamagedTile, DamagedTileError, Level, Slide, SlideError, shrink_by_bands
from histoflow.slides.tiff import float_or_none, truncation

MPP_RANGE = (0.01, 50.0)  # a property outside this is a scanner's or software's default, not a resolution


class UnsupportedByOpenSlide(SlideError):
    """OpenSlide does not read this file's format (slide.backend=auto then reads it with tifffile)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.reason = reason
        super().__init__(f"{path}: OpenSlide does not read it ({reason}). Fix: slide.backend=auto or tifffile "
                         "(plain TIFFs), or convert it to a pyramidal TIFF")


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide; each process (a loader worker) opens its own handle."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike[str], source_mpp: float | None = None) -> None:
        super().__init__(path, source_mpp)
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError as e:
            cut = _tiff_truncation(self.path)  # OpenSlide calls a TIFF cut short an unsupported file
            if cut:
                raise SlideError(f"{self.path}: {cut}") from None
            raise UnsupportedByOpenSlide(self.path, str(e) or "an unsupported or missing image file") from None
        except openslide.OpenSlideError as e:  # a file of a known format that does not open: damaged, cut short
            raise SlideError(f"{self.path}: OpenSlide cannot open it ({e}). Fix: copy or download the slide again "
                             "(compare its size with the original's), or re-export it") from None
        self._pid, self._lock = os.getpid(), threading.Lock()
        self.levels = [Level(w, h, float(d)) for (w, h), d in zip(self._osr.level_dimensions,
                                                                   self._osr.level_downsamples)]

    def _handle(self) -> openslide.OpenSlide:
        """This process's handle: a forked loader worker must not share its parent's."""
        if self._pid != os.getpid():
            self._osr, self._pid, self._lock = openslide.OpenSlide(self.path), os.getpid(), threading.Lock()
        return self._osr

    def _reopen(self) -> None:
        """A fresh handle after a failed read (OpenSlide's handle stays in its error state)."""
        self._osr.close()
        self._osr = openslide.OpenSlide(self.path)

    def close(self) -> None:
        self._osr.close()

    @property
    def file_mpp(self) -> float | None:
        """openslide.mpp-x (and -y, their mean where both are given), when within MPP_RANGE."""
        values = [float_or_none(self._osr.properties.get(f"openslide.mpp-{axis}")) for axis in "xy"]
        values = [v for v in values if v is not None and MPP_RANGE[0] <= v <= MPP_RANGE[1]]
        return sum(values) / len(values) if values else None

    def associated_images(self) -> dict[str, np.ndarray]:
        return {name: _on_white(image) for name, image in self._handle().associated_images.items()}

    def thumbnail(self, max_size: int = 1024, damaged: list[DamagedTile] | None = None) -> np.ndarray:
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        width, height = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        # the level just finer than the thumbnail, shrunk by area averaging a band at a time (as the tifffile reader)
        level = self.best_level_for_downsample(w0 / width)
        lv = self.levels[level]
        return shrink_by_bands(lambda x, y, w, h: self.read_region((round(x * lv.downsample), round(y * lv.downsample)),
                                                                   level, (w, h)), lv.width, lv.height, width, height,
                               damaged)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if not 0 <= level < len(self.levels):
            raise IndexError(f"{self.path}: level {level} does not exist (the slide has {len(self.levels)})")
        width, height = int(size[0]), int(size[1])
        if width < 0 or height < 0:
            raise ValueError(f"region size must be non-negative, got {size}")
        if width == 0 or height == 0:
            return np.full((height, width, 3), 255, np.uint8)
        handle = self._handle()
        with self._lock:  # one read at a time on a handle; its error state is the handle's
            try:
                return _on_white(handle.read_region((int(location[0]), int(location[1])), level, (width, height)))
            except openslide.OpenSlideError:
                self._reopen()
        raise DamagedTileError(self.path, self._damaged_tiles(location, level, width, height))

    def _damaged_tiles(self, location: tuple[int, int], level: int, width: int, height: int) -> list[DamagedTile]:
        """The stored tiles of a failed region that do not read, each tried alone with a fresh handle after a
        failure (OpenSlide names no tile, only that the read failed)."""
        props = self._osr.properties
        tile_w = int(props.get(f"openslide.level[{level}].tile-width", 0)) or width
        tile_h = int(props.get(f"openslide.level[{level}].tile-height", 0)) or height
        ds = self.levels[level].downsample
        x0, y0 = round(location[0] / ds), round(location[1] / ds)
        damaged = []
        with self._lock:
            for row in range(max(y0, 0) // tile_h, (y0 + height - 1) // tile_h + 1):
                for col in range(max(x0, 0) // tile_w, (x0 + width - 1) // tile_w + 1):
                    x, y = col * tile_w, row * tile_h
                    try:
                        self._osr.read_region((round(x * ds), round(y * ds)), level, (tile_w, tile_h))
                    except openslide.OpenSlideError as e:
                        damaged.append(DamagedTile(level, row, col, x, y, f"does not decode (OpenSlide: {e})"))
                        self._reopen()
        if not damaged:  # the region failed, no single tile does: name the region
            damaged.append(DamagedTile(level, y0 // tile_h, x0 // tile_w, x0, y0, "the region does not read"))
        return damaged


def _tiff_truncation(path: Path) -> str | None:
    """tiff.truncation of a file that tifffile opens, else None (not a TIFF at all)."""
    try:
        with tifffile.TiffFile(path) as tif:
            return truncation(tif)
    except (tifffile.TiffFileError, ValueError, OSError):
        return None


def _on_white(image: Image.Image) -> np.ndarray:
    """An RGBA PIL image over white, as (H, W, 3) uint8: where OpenSlide leaves it transparent (nothing scanned,
    outside the slide) the colour is raised by 255 - alpha, saturating. Done in uint8, in place, and skipped where
    all is opaque (tissue), so a read costs one copy of the region, not four."""
    rgba = np.asarray(image if image.mode == "RGBA" else image.convert("RGBA"))
    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgb
    gap = 255 - alpha[..., None]  # what lifts a pixel to white
    np.add(rgb, np.minimum(gap, 255 - rgb), out=rgb)
    return rgb
