"""What a slide's TIFF directories say: decodable compressions, Aperio fields, resolution, the file's expected
size, and pixel blocks as 8-bit RGB."""

from __future__ import annotations

import math
import struct

import numpy as np
import tifffile
from tifffile import TIFF, TiffPage

MPP_RANGE = (0.01, 50.0)  # resolution tags outside this are scanner/software defaults (72 dpi ...)


def has_decoder(compression: int) -> bool:
    """Whether tifffile can decode this TIFF compression here (most codecs come from imagecodecs)."""
    return compression == 1 or compression in TIFF.DECOMPRESSORS


def aperio_fields(description: str) -> dict[str, str]:
    """The `key = value` fields of an Aperio ImageDescription."""
    fields = {}
    for part in description.split("|")[1:]:  # the first part is the free-text header
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def tag_mpp(page: TiffPage) -> float | None:
    """Microns per pixel from the TIFF resolution tags, when the unit is a length and plausible."""
    unit = page.tags.valueof("ResolutionUnit", 2)  # the TIFF default unit is the inch
    res = page.tags.valueof("XResolution")
    microns = {2: 25400.0, 3: 10000.0}.get(int(unit))
    if microns is None or res is None:
        return None
    per_unit = res[0] / res[1] if isinstance(res, tuple) else float(res)
    if not per_unit > 0:
        return None
    mpp = microns / per_unit
    return mpp if MPP_RANGE[0] <= mpp <= MPP_RANGE[1] else None


def expected_size(tif: tifffile.TiffFile) -> int:
    """The bytes the file's directories say it holds: up to the end of its last segment, or of the tag count of
    the directory tifffile stopped at (the one after the last it read; beyond the end of a file cut short)."""
    fmt, fh, at = tif.tiff, tif.filehandle, tif.pages.next_page_offset  # where the next directory's offset is kept
    fh.seek(at)
    raw = fh.read(fmt.offsetsize)
    directories = [struct.unpack(fmt.offsetformat, raw)[0]] if len(raw) == fmt.offsetsize else []
    ends = [at + fmt.offsetsize]
    for page in list(tif.pages) + [level.keyframe for series in tif.series for level in series.levels[1:]]:
        ends.append(int(np.max(np.add(page.dataoffsets, page.databytecounts), initial=0)))
        directories += getattr(page, "subifds", None) or ()
    return max(ends + [offset + fmt.tagnosize for offset in directories if offset])


def page_dtype(page: TiffPage) -> np.dtype:
    """The sample dtype of a page already checked in Slide._find_pages."""
    assert page.dtype is not None  # pages without a numpy dtype are rejected on open
    return page.dtype


def to_rgb8(raw: np.ndarray, page: TiffPage) -> np.ndarray:
    """Convert an (H, W, samples) block of `page` to (H, W, 3) uint8."""
    if raw.dtype != np.uint8:
        if raw.dtype.kind == "f":
            # floats are taken as 0..1 intensities; scaling by the block's max would differ tile to tile
            raw = np.clip(raw * 255.0, 0, 255).round().astype(np.uint8)
        else:
            raw = (raw.astype(np.float32) * (255.0 / np.iinfo(raw.dtype).max)).round().astype(np.uint8)
    if page.photometric == 0:  # MINISWHITE
        raw = 255 - raw
    if page.photometric in (0, 1):  # gray, alpha (if any) dropped
        return np.repeat(raw[..., :1], 3, axis=-1)
    return np.ascontiguousarray(raw[..., :3])  # RGB (JPEG YCbCr is decoded to RGB); alpha dropped


def truncation(tif: tifffile.TiffFile) -> str | None:
    """Why a TIFF (SVS, NDPI, generic) is cut short, with the fix; None when its directories fit in the file."""
    size, expected = tif.filehandle.size, expected_size(tif)
    if expected <= size:
        return None
    return (f"the file is truncated: it has {size:,} bytes but its TIFF directories need {expected:,}. Fix: copy or "
            "download the slide again (compare its size with the original's)")
