"""The tifffile backend of the slide interface (slides/slide.py): Aperio SVS, pyramidal tiled TIFF, plain TIFF.

Only the tiles or strips a region overlaps are read and decoded (uncompressed images are
memory-mapped), so memory stays bounded by the region size whatever the slide size.
"""

from __future__ import annotations

import os
import threading
import zlib
from typing import BinaryIO

import numpy as np
import tifffile
from cachetools import LRUCache
from tifffile import TiffPage

from histoflow.slides.slide import DamagedTile, DamagedTileError, Level, Slide, SlideError, shrink_by_bands
from histoflow.slides.tiff import (
    aperio_fields,
    float_or_none,
    has_decoder,
    page_dtype,
    tag_mpp,
    to_rgb8,
    truncation,
)

_JPEG2000 = (33003, 33004, 33005, 34712)  # Aperio YCbCr/RGB J2K and the JPEG 2000 TIFF code
CACHE_BYTES = 128 << 20  # decoded tiles kept per open slide (a row of 512-px tiles across a 60,000-px slide)
_CONVERT_HINT = (
    "convert it to a tiled pyramidal TIFF, e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`"
)


class TiffSlide(Slide):
    """A slide read with tifffile: Aperio SVS, pyramidal tiled TIFF, and plain (strip) TIFF, which OpenSlide
    refuses. `cache_bytes` bounds the decoded tiles kept for reuse by later reads (0: none).
    """

    backend = "tifffile"

    def __init__(self, path: str | os.PathLike[str], source_mpp: float | None = None,
                 cache_bytes: int = CACHE_BYTES) -> None:
        super().__init__(path, source_mpp)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, ValueError) as exc:
            raise SlideError(
                f"{self.path}: not a TIFF/SVS file ({exc}); histoflow reads Aperio SVS, tiled and plain TIFF: "
                + _CONVERT_HINT
            ) from None
        try:
            self._pages, self._thumb_page = self._find_pages()
        except Exception:
            self._tif.close()
            raise
        w0, h0 = self._pages[0].imagewidth, self._pages[0].imagelength
        self.levels = [
            Level(p.imagewidth, p.imagelength, (w0 / p.imagewidth + h0 / p.imagelength) / 2) for p in self._pages
        ]
        self._file: BinaryIO | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._memmaps: dict[int, np.ndarray] = {}
        # decoded tiles/strips by (page, segment), least recently used dropped first beyond cache_bytes: neighbouring
        # reads share stored tiles (a 224-px grid over 256-px tiles decodes most tiles twice without it)
        self._cache: LRUCache[tuple[int, int], np.ndarray] = LRUCache(cache_bytes, getsizeof=lambda seg: seg.nbytes)
        self._cache_lock = threading.Lock()  # cachetools' caches are not thread-safe
        description = self._pages[0].description if self._tif.is_svs else ""
        self._aperio = aperio_fields(description)

    def _find_pages(self) -> tuple[list[TiffPage], TiffPage | None]:
        """The level pages of the main image (and Aperio's stored thumbnail), checked complete and decodable."""
        cut = truncation(self._tif)
        if cut:
            raise SlideError(f"{self.path}: {cut}")
        if not self._tif.series:
            raise SlideError(f"{self.path}: the TIFF holds no image; {_CONVERT_HINT}")
        series = self._tif.series[0]
        pages = [level.keyframe for level in series.levels]
        thumb = next((s.keyframe for s in self._tif.series if self._tif.is_svs and s.name == "Thumbnail"), None)
        for page in pages + ([thumb] if thumb is not None else []):
            dtype_ok = page.dtype is not None and page.dtype.kind in "uf"
            if not dtype_ok or page.imagedepth != 1 or page.photometric not in (0, 1, 2, 6):
                raise SlideError(
                    f"{self.path}: unsupported image layout (depth {page.imagedepth}, photometric "
                    f"{page.photometric!r}, dtype {page.dtype}); {_CONVERT_HINT}"
                )
            if not has_decoder(page.compression):
                name = getattr(page.compression, "name", str(page.compression))
                kind = "JPEG 2000" if page.compression in _JPEG2000 else name
                raise SlideError(
                    f"{self.path}: its tiles are {kind} compressed and no {kind} decoder is installed; "
                    "pip install imagecodecs"
                )
        return pages, thumb

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file handles."""
        self._memmaps.clear()
        with self._cache_lock:
            self._cache.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tif.close()

    # --- metadata -------------------------------------------------------------------------

    @property
    def file_mpp(self) -> float | None:
        """Microns per pixel at level 0 as the file says (Aperio's MPP, else the TIFF resolution tags), or None."""
        if self._aperio:
            return float_or_none(self._aperio.get("MPP"))
        return tag_mpp(self._pages[0])

    @property
    def objective_power(self) -> float | None:
        """Scanning objective magnification (Aperio AppMag), or None."""
        return float_or_none(self._aperio.get("AppMag"))

    def associated_images(self) -> dict[str, np.ndarray]:
        """Aperio's label, macro and thumbnail images: the small named series beside the pyramid."""
        return {s.name.lower(): to_rgb8(s.asarray(), s.keyframe) for s in self._tif.series[1:] if s.name}

    # --- pixels ---------------------------------------------------------------------------

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 of `size` pixels at `level` from level-0 `location`; outside the slide is white."""
        if not 0 <= level < len(self.levels):
            raise IndexError(f"{self.path}: level {level} does not exist (the slide has {len(self.levels)})")
        width, height = int(size[0]), int(size[1])
        if width < 0 or height < 0:
            raise ValueError(f"region size must be non-negative, got {size}")
        ds = self.levels[level].downsample
        x, y = round(location[0] / ds), round(location[1] / ds)
        return self._read_page(self._pages[level], x, y, width, height)

    def thumbnail(self, max_size: int = 1024, damaged: list[DamagedTile] | None = None) -> np.ndarray:
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        pages = self._pages + ([self._thumb_page] if self._thumb_page is not None else [])
        big_enough = [p for p in pages if p.imagewidth >= tw and p.imagelength >= th]
        page = min(big_enough, key=lambda p: p.imagewidth * p.imagelength, default=self._pages[0])
        # a band at a time: memory is bounded by the band, not the page
        return shrink_by_bands(lambda x, y, w, h: self._read_page(page, x, y, w, h), page.imagewidth,
                               page.imagelength, tw, th, damaged)

    def _read_bytes(self, offset: int, count: int) -> bytes:
        # own handle, reopened after a fork: DataLoader workers must not share one file offset
        with self._lock:
            if self._file is None or self._pid != os.getpid():
                self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
                self._pid = os.getpid()
            self._file.seek(offset)
            return self._file.read(count)

    def _read_page(self, page: TiffPage, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 at page pixel (x, y), white where outside the page."""
        out = np.full((height, width, 3), 255, np.uint8)
        img_w, img_h = page.imagewidth, page.imagelength
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, img_w), min(y + height, img_h)
        if x1 <= x0 or y1 <= y0:
            return out
        if page.is_memmappable and page.parent.filehandle.is_file:
            arr = self._memmaps.get(page.offset)
            if arr is None:
                dtype = np.dtype(page.parent.byteorder + page_dtype(page).char)
                arr = np.memmap(self.path, dtype, "r", offset=page.dataoffsets[0], shape=page.shaped)
                self._memmaps[page.offset] = arr
            block = arr[:, 0, y0:y1, x0:x1, :]  # (planes, h, w, samples per plane)
            raw = np.moveaxis(block, 0, 2).reshape(y1 - y0, x1 - x0, -1)
        else:
            raw = self._decode_segments(page, x0, y0, x1, y1)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = to_rgb8(raw, page)
        return out

    def _decode_segments(self, page: TiffPage, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Decode only the tiles/strips overlapping [x0, x1) x [y0, y1) into an (h, w, samples) array."""
        if page.is_tiled:
            seg_w, seg_h = page.tilewidth, page.tilelength
        else:  # strips are full-width tiles
            seg_w, seg_h = page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)
        cols, rows = -(-page.imagewidth // seg_w), -(-page.imagelength // seg_h)
        planes = page.samplesperpixel if page.planarconfig == 2 else 1
        samples_per_plane = page.samplesperpixel // planes
        # missing (zero-byte) segments stay white, as OpenSlide shows them
        dtype = page_dtype(page)
        white = 1.0 if dtype.kind == "f" else np.iinfo(dtype).max
        raw = np.full((y1 - y0, x1 - x0, page.samplesperpixel), white, dtype)
        decode = page.decode
        # JPEG segments need the page's shared tables, as tifffile's own TiffPage.segments passes them
        jpeg = {}
        if page.compression in (6, 7, 33007, 34892):
            jpeg = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        damaged: list[DamagedTile] = []  # every segment of the region is tried, then all damaged ones named
        for plane in range(planes):
            for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
                for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
                    index = (plane * rows + row) * cols + col
                    with self._cache_lock:
                        seg = self._cache.get((page.offset, index))
                    if seg is None:
                        count = page.databytecounts[index]
                        if not count:
                            continue
                        stored = self._read_bytes(page.dataoffsets[index], count)
                        try:
                            data, _, _ = decode(stored, index, **jpeg)
                        except (ValueError, OSError, zlib.error, RuntimeError) as exc:
                            if isinstance(exc, RuntimeError) and type(exc).__module__ != "imagecodecs":
                                raise  # not a codec's error of these bytes
                            damaged.append(self._damaged(page, row, col, seg_w, seg_h, exc))
                            continue
                        if data is None:
                            continue
                        seg = data[0]  # (h, w, samples); edge segments may come back cropped
                        if seg.nbytes <= self._cache.maxsize:  # a larger one LRUCache refuses (ValueError)
                            with self._cache_lock:
                                self._cache[page.offset, index] = seg
                    sy, sx = row * seg_h, col * seg_w
                    ay0, ax0 = max(y0, sy), max(x0, sx)
                    ay1, ax1 = min(y1, sy + seg.shape[0]), min(x1, sx + seg.shape[1])
                    if ay1 <= ay0 or ax1 <= ax0:
                        continue
                    channels = slice(plane * samples_per_plane, (plane + 1) * samples_per_plane)
                    target = raw[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0, channels]
                    target[...] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        if damaged:
            raise DamagedTileError(self.path, damaged)
        return raw

    def _damaged(self, page: TiffPage, row: int, col: int, seg_w: int, seg_h: int, exc: Exception) -> DamagedTile:
        """The record of the stored segment at (row, col) of `page` that raised `exc` when decoded."""
        level = next((i for i, p in enumerate(self._pages) if p is page), -1)
        reason = f"does not decode ({type(exc).__name__}: {exc})"
        return DamagedTile(level, row, col, col * seg_w, row * seg_h, reason)
