"""Decode any image file the field produces into 8-bit RGB, saying what had to be converted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from histoflow.common.errors import HistoflowError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


class UnreadableImage(HistoflowError, ValueError):
    """The file is not a decodable image."""


def _decode(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        # tifffile reads 16-bit, planar and compressed TIFFs that Pillow cannot
        return tifffile.imread(path, key=0)
    with Image.open(path) as im:
        if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I", "F"):
            im = im.convert("RGB")  # palette, CMYK, YCbCr, 1-bit
        im.load()  # a truncated file fails here, not later
        return np.asarray(im)


def to_rgb8(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Convert a decoded image array to (H, W, 3) uint8; the note lists the conversions made."""
    notes = []
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f":
            scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
            arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
            notes.append("float to 8-bit")
        elif arr.dtype.itemsize >= 2:
            # scale by the container's full range, so every image of a set is scaled alike
            bits = 16 if arr.max(initial=0) <= 65535 else 8 * arr.dtype.itemsize  # Pillow's 'I' holds 16-bit PNGs
            arr = (arr.astype(np.float64) * (255.0 / (2**bits - 1))).round().astype(np.uint8)
            notes.append(f"{bits}-bit to 8-bit")
        else:
            arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
        notes.append("grayscale to RGB")
    elif arr.ndim == 3 and arr.shape[-1] == 2:
        arr = np.repeat(arr[..., :1], 3, axis=-1)
        notes.append("grayscale+alpha to RGB")
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
        notes.append("alpha dropped")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise UnreadableImage(f"unsupported image shape {arr.shape}")
    return np.ascontiguousarray(arr), ", ".join(notes)


def read_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """Read an image file as (H, W, 3) uint8 RGB; raises UnreadableImage naming the file."""
    path = Path(path)
    try:
        arr = _decode(path)
    except Exception as e:  # Pillow and tifffile raise many types for bad files
        raise UnreadableImage(f"{path}: cannot decode ({type(e).__name__}: {e})") from e
    return to_rgb8(arr)
