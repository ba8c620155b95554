"""A slide level's stored JPEG tiles decoded where the model runs (slide.decode): the loader workers read only the
compressed bytes, the device decodes a batch of them in one call (torchvision.io.decode_jpeg, nvJPEG on a GPU) and
cuts the grid's tiles out of them, resizing there too where the grid asks for another resolution.

Which slides: a TIFF (Aperio SVS, generic tiled TIFF) whose level is stored as 8-bit JPEG tiles (compression 7),
RGB or YCbCr photometric, one plane. Everything else (JPEG 2000, LZW, strips, OpenSlide-only formats) is read on
the CPU as before, said once per slide. `slide.decode`: `cpu` always the CPU reader; `device` the device wherever
the level's tiles are JPEG; `auto` (the default) the device where it is a GPU with a JPEG decoder, else the CPU.

A TIFF's JPEG tiles are abbreviated streams: the quantisation and Huffman tables are in the page's JPEGTables, spliced
in after each tile's start marker. Their colour transform is the TIFF's to say, not the stream's: Aperio writes RGB
samples (no YCbCr transform) under photometric RGB with neither a JFIF nor an Adobe marker, which libjpeg and nvJPEG
would take for YCbCr (component ids other than R, G, B). An Adobe APP14 marker says which (transform 0: RGB, 1:
YCbCr), as tifffile tells imagecodecs (tifffile.jpeg_decode_colorspace): every decoder then agrees with the reader.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from histoflow.common.errors import ConfigError

log = logging.getLogger(__name__)
DECODES = ("auto", "cpu", "device")
_JPEG = 7  # TIFF compression: JPEG (TechNote 2); 6 (old-style JPEG) is left to the CPU reader
_RGB, _YCBCR = 2, 6  # TIFF photometric
_GATHER = 1 << 22  # output pixels gathered at once: bounds the index tensors (int64) to ~32 MB a batch
_said: set[tuple[str, str]] = set()
_codec: dict[str, str | None] = {}  # device -> why it has no JPEG decoder (None: it has one)


def adobe_marker(transform: int) -> bytes:
    """An Adobe APP14 segment: DCTEncodeVersion 100, no flags, `transform` 0 (RGB as stored) or 1 (YCbCr)."""
    return b"\xff\xee\x00\x0eAdobe" + bytes([0, 100, 0, 0, 0, 0, transform])


def _segments(stream: bytes) -> list[int]:
    """The markers of a JPEG stream's header, up to its first scan (SOS) or its end."""
    markers, at = [], 2
    while at + 4 <= len(stream) and stream[at] == 0xFF:
        marker = stream[at + 1]
        markers.append(marker)
        if marker in (0xDA, 0xD9):
            break
        at += 2 + int.from_bytes(stream[at + 2:at + 4], "big")
    return markers


@dataclass
class StoredBatch:
    """A batch of grid tiles as the compressed stored tiles under them (made in a loader worker)."""

    streams: list[torch.Tensor]  # complete JPEG streams (uint8, on the CPU), one per distinct stored tile
    local: np.ndarray  # (N, k, k) int64: the stream under each grid tile's k x k block of stored tiles; -1: white
    offsets: np.ndarray  # (N, 2) int64: (y, x) of each grid tile in its block's top-left stored tile
    read_size: int  # grid tile side read, pixels of the level
    tile_size: int  # side handed on (resized from read_size where they differ)
    tile_h: int  # stored tile height and width
    tile_w: int


class JpegLevel:
    """The stored JPEG tiles of one TIFF page (a slide level): where their bytes are, and the stream head they lack."""

    def __init__(self, path: Path, page: tifffile.TiffPage) -> None:
        self.path, self._fd, self._pid = path, -1, -1
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.rows = -(-int(page.imagelength) // self.tile_h)
        self.cols = -(-int(page.imagewidth) // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        tables = bytes(page.jpegtables or b"")
        first = next((i for i, c in enumerate(self.counts) if c), None)
        head = self._read(int(first)) if first is not None else b""
        markers = _segments(tables) + _segments(head)
        app14 = b""
        if 0xEE not in markers and page.samplesperpixel == 3:
            # as tifffile.jpeg_decode_colorspace: under photometric RGB a stream without JFIF (APP0) holds RGB
            app14 = adobe_marker(0 if page.photometric == _RGB and 0xE0 not in markers else 1)
        # SOI, the colour transform, then the tables (their own SOI and EOI dropped); each tile's stream follows its SOI
        self.prefix = b"\xff\xd8" + app14 + (tables[2:-2] if len(tables) > 4 else b"")
        self.close()  # the loader workers open their own

    @classmethod
    def find(cls, path: str | os.PathLike[str], width: int, height: int) -> JpegLevel | str:
        """The JPEG-tiled page of `path` that is a width x height level, or why there is none (a reason)."""
        path = Path(path)
        try:
            with tifffile.TiffFile(path) as tif:
                pages = list(tif.pages) + [lv.keyframe for s in tif.series for lv in s.levels]
                page = next((p for p in pages if isinstance(p, tifffile.TiffPage)
                             and (p.imagewidth, p.imagelength) == (width, height)), None)
                if page is None:
                    return f"no TIFF page of the level's {width} x {height} px"
                if not page.is_tiled:
                    return "the level is stored in strips, not tiles"
                if page.compression != _JPEG:
                    return f"its tiles are {_compression(page.compression)}, not JPEG"
                if (page.photometric not in (_RGB, _YCBCR) or page.bitspersample != 8 or page.samplesperpixel != 3
                        or page.planarconfig != 1 or page.imagedepth > 1):
                    return (f"its JPEG tiles are photometric {int(page.photometric)}, {page.bitspersample}-bit, "
                            f"{page.samplesperpixel} samples in {page.planarconfig} plane(s), not 8-bit RGB/YCbCr")
                return cls(path, page)
        except (tifffile.TiffFileError, ValueError, OSError) as e:
            return f"not a TIFF (an OpenSlide-only format): {e}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1, "_pid": -1}  # each loader worker opens the file itself

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1

    def _read(self, index: int) -> bytes:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, int(self.counts[index]), int(self.offsets[index]))

    def stream(self, index: int) -> bytes:
        """Stored tile `index` (row * cols + col) as a complete JPEG stream."""
        return self.prefix + self._read(index)[2:]

    def plan(self, level_x: np.ndarray, level_y: np.ndarray, read_size: int, tile_size: int) -> StoredBatch:
        """The stored tiles under grid tiles at level pixels (level_x, level_y), read_size px square: their
        streams, and where each grid tile lies in them."""
        th, tw = self.tile_h, self.tile_w
        r0, c0 = level_y // th, level_x // tw
        k = int(max(((level_y + read_size - 1) // th - r0).max(), ((level_x + read_size - 1) // tw - c0).max())) + 1
        rows = r0[:, None, None] + np.arange(k)[None, :, None]
        cols = c0[:, None, None] + np.arange(k)[None, None, :]
        inside = (rows < self.rows) & (cols < self.cols)
        index = np.where(inside, rows * self.cols + cols, -1)
        index[inside] = np.where(self.counts[index[inside]] > 0, index[inside], -1)  # missing tiles: white
        stored, local = np.unique(index, return_inverse=True)
        local = local.reshape(index.shape)
        if stored[0] == -1:  # -1 (no stored tile: white) sorts first and stays -1
            stored, local = stored[1:], local - 1
        streams = [torch.frombuffer(bytearray(self.stream(int(i))), dtype=torch.uint8) for i in stored]
        offsets = np.stack([level_y - r0 * th, level_x - c0 * tw], 1)
        return StoredBatch(streams, local.astype(np.int64), offsets.astype(np.int64), read_size, tile_size, th, tw)


def _compression(code: int) -> str:
    names = {1: "uncompressed", 5: "LZW", 6: "old-style JPEG", 8: "Deflate", 32773: "PackBits", 34887: "LERC",
             33003: "JPEG 2000", 33005: "JPEG 2000", 34712: "JPEG 2000", 50000: "ZSTD", 50001: "WebP"}
    return f"{names.get(int(code), 'compression')} ({int(code)})"


def device_codec(device: torch.device) -> str | None:
    """Why `device` cannot decode JPEG through torchvision (no nvJPEG in this build...), or None when it can: a tiny
    JPEG decoded there once per process."""
    key = str(device)
    if key not in _codec:
        probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
        try:
            decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
            _codec[key] = None
        except (RuntimeError, NotImplementedError) as e:
            _codec[key] = f"torchvision decodes no JPEG on {device} ({e})"
    return _codec[key]


def wants_device(decode: str, device: torch.device) -> bool:
    """Whether slide.decode asks for the device to decode (where the tiles are JPEG): `device`, or `auto` on a GPU."""
    if decode not in DECODES:
        raise ConfigError(f"slide.decode={decode!r}: expected one of {', '.join(DECODES)} (auto: the GPU where there "
                          "is one and the slide's tiles are JPEG)")
    return decode == "device" or (decode == "auto" and device.type == "cuda")


def jpeg_level(path: str | os.PathLike[str], width: int, height: int, decode: str,
               device: torch.device) -> JpegLevel | None:
    """slide.decode for one slide level: its JpegLevel where the device decodes it, else None (the CPU reader); the
    choice said once per slide."""
    if not wants_device(decode, device):
        return None
    found = JpegLevel.find(path, width, height)
    why = found if isinstance(found, str) else device_codec(device)
    if why is not None:
        _say_once(path, f"read on the CPU (slide.decode={decode}): {why}",
                  logging.WARNING if decode == "device" else logging.INFO)
        return None
    _say_once(path, f"stored JPEG tiles decoded on {device} (slide.decode={decode})", logging.INFO)
    return found


def _say_once(path: str | os.PathLike[str], text: str, level: int) -> None:
    if (str(path), text) not in _said:
        _said.add((str(path), text))
        log.log(level, "%s: %s", path, text)


def decode_batch(batch: StoredBatch, device: torch.device) -> torch.Tensor:
    """(N, tile_size, tile_size, 3) uint8 on `device`: the stored tiles decoded there in one call, the grid tiles
    gathered out of them, and resized (the CPU reader's box filter) where the grid asks."""
    th, tw, size = batch.tile_h, batch.tile_w, batch.read_size
    decoded = decode_jpeg(batch.streams, mode=ImageReadMode.RGB, device=device) if batch.streams else []
    white = torch.full((3, th, tw), 255, dtype=torch.uint8, device=device)
    # a stored tile decodes to its full tile size; one that comes out otherwise is cropped or padded white
    tiles = [t if t.shape[1:] == (th, tw) else _fit(t, white) for t in decoded] + [white]
    # HWC: the layout libjpeg writes (torchvision's CPU tiles are views of it), and the pixels gathered below
    pixels = torch.stack([t.permute(1, 2, 0) for t in tiles]).reshape(-1, 3)  # (stored + 1) * th * tw pixels
    local = torch.as_tensor(batch.local, device=device)
    local = torch.where(local < 0, len(tiles) - 1, local)
    n, k = local.shape[0], local.shape[1]
    offsets = torch.as_tensor(batch.offsets, device=device)
    steps = torch.arange(size, device=device)
    ys, xs = offsets[:, :1] + steps, offsets[:, 1:] + steps  # (N, size) within the block
    out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
    chunk = max(1, _GATHER // (size * size))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        block = local[a:b].reshape(b - a, k * k)
        which = torch.gather(block, 1,
                             ((ys[a:b] // th)[:, :, None] * k + (xs[a:b] // tw)[:, None, :]).reshape(b - a, -1))
        flat = (which.view(b - a, size, size) * (th * tw) + ((ys[a:b] % th) * tw)[:, :, None]
                + (xs[a:b] % tw)[:, None, :])
        out[a:b] = pixels[flat]
    if batch.tile_size != size:
        out = resize_tiles(out, batch.tile_size)
    return out


def box_weights(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """(dst, src) float32: PIL's BOX resampling of a line as a matrix (Pillow's precompute_coeffs): each output pixel
    the mean of the source pixels whose centres fall in its footprint (a nearest pixel where it enlarges)."""
    scale = src / dst
    support = 0.5 * max(scale, 1.0)
    weights = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), src)
        taps = (torch.arange(lo, hi, dtype=torch.float64) - centre + 0.5) / max(scale, 1.0)
        kept = ((taps > -0.5) & (taps <= 0.5)).double()
        weights[i, lo:hi] = kept / kept.sum()
    return weights.float().to(device)


def resize_tiles(tiles: torch.Tensor, side: int) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, side, side, 3) uint8 as the CPU reader resizes (PIL's BOX filter): along rows, then
    columns, rounded to 8 bits between the two passes as Pillow does; two matrix products on the tiles' device."""
    weights = box_weights(tiles.shape[1], side, tiles.device)
    x = tiles.permute(0, 3, 1, 2).float()  # (N, 3, S, S)
    # halves rounded up, as Pillow's fixed point does (torch.round would round them to even)
    x = torch.matmul(x, weights.T).add_(0.5).floor_().clamp_(0, 255)  # each row resized: (N, 3, S, side)
    x = torch.matmul(weights, x).add_(0.5).floor_().clamp_(0, 255)  # then each column: (N, 3, side, side)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _fit(tile: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    out = white.clone()
    h, w = min(tile.shape[1], out.shape[1]), min(tile.shape[2], out.shape[2])
    out[:, :h, :w] = tile[:, :h, :w]
    return out
