"""Tissue detection on a slide thumbnail and the grid of tissue tiles to extract."""

from __future__ import annotations

import inspect

import numpy as np
from skimage import color, filters, morphology

from histoflow.slides.slide import Slide

# Otsu never goes below this: on a nearly blank slide it would split background noise into "tissue"
_SATURATION_FLOOR = 0.05
# objects and holes under this fraction of the thumbnail are dust, debris or lumen, not tissue structure
_SMALL_FRACTION = 0.0005


def _morphology_size_kwarg(func: object, size: int) -> dict[str, int]:
    """skimage 0.26 renamed min_size/area_threshold to max_size (removing objects <= it)."""
    params = inspect.signature(func).parameters  # type: ignore[arg-type]
    if "max_size" in params:
        return {"max_size": size}
    return {"min_size": size + 1} if "min_size" in params else {"area_threshold": size + 1}


def tissue_mask(thumbnail: np.ndarray, min_saturation: float | None = None) -> np.ndarray:
    """Boolean (H, W) tissue mask of an RGB thumbnail by HSV saturation (Otsu unless min_saturation)."""
    if thumbnail.ndim != 3 or thumbnail.shape[-1] < 3:
        raise ValueError(f"tissue_mask needs an (H, W, 3) RGB image, got shape {thumbnail.shape}")
    saturation = color.rgb2hsv(thumbnail[..., :3])[..., 1]
    if min_saturation is not None:
        threshold = float(min_saturation)
    elif np.ptp(saturation) < 1e-6:
        return np.zeros(saturation.shape, bool)  # a flat image has no threshold to find
    else:
        threshold = max(float(filters.threshold_otsu(saturation)), _SATURATION_FLOOR)
    mask = saturation > threshold
    small = max(1, int(_SMALL_FRACTION * mask.size))
    mask = morphology.remove_small_objects(mask, **_morphology_size_kwarg(morphology.remove_small_objects, small))
    return morphology.remove_small_holes(mask, **_morphology_size_kwarg(morphology.remove_small_holes, small))


def tile_grid(
    slide: Slide,
    tile_size: int,
    level: int = 0,
    stride: int | None = None,
    mask: np.ndarray | None = None,
    min_tissue: float = 0.5,
) -> np.ndarray:
    """(N, 2) level-0 (x, y) origins of tile_size tiles at `level` with tissue fraction >= min_tissue."""
    if tile_size <= 0 or (stride is not None and stride <= 0):
        raise ValueError(f"tile_size and stride must be positive, got {tile_size} and {stride}")
    stride = tile_size if stride is None else stride
    if mask is None:
        mask = tissue_mask(slide.thumbnail())
    mask = np.asarray(mask, bool)
    lv = slide.levels[level]
    # only whole tiles inside the level, so every tile is a full read
    cols = (lv.width - tile_size) // stride + 1 if lv.width >= tile_size else 0
    rows = (lv.height - tile_size) // stride + 1 if lv.height >= tile_size else 0
    if cols == 0 or rows == 0:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(cols) * stride  # level pixels
    ys = np.arange(rows) * stride
    # each tile's footprint in mask pixels, widened to at least one pixel so small tiles still count
    w0, h0 = slide.dimensions
    sx, sy = mask.shape[1] / w0 * lv.downsample, mask.shape[0] / h0 * lv.downsample
    mx0 = np.clip(np.floor(xs * sx).astype(np.int64), 0, mask.shape[1] - 1)
    my0 = np.clip(np.floor(ys * sy).astype(np.int64), 0, mask.shape[0] - 1)
    mx1 = np.clip(np.ceil((xs + tile_size) * sx).astype(np.int64), mx0 + 1, mask.shape[1])
    my1 = np.clip(np.ceil((ys + tile_size) * sy).astype(np.int64), my0 + 1, mask.shape[0])
    # summed-area table: every tile's tissue count in four lookups, no per-tile loop
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    counts = sat[my1][:, mx1] - sat[my0][:, mx1] - sat[my1][:, mx0] + sat[my0][:, mx0]
    areas = np.outer(my1 - my0, mx1 - mx0)
    keep_rows, keep_cols = np.nonzero(counts / areas >= min_tissue)
    origins = np.stack([xs[keep_cols], ys[keep_rows]], axis=1).astype(np.float64) * lv.downsample
    return np.round(origins).astype(np.int64)
