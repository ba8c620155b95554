"""Synthetic whole-slide images of any size, for trying the slide pipeline, tests and benchmarks.

    write_pyramid("big.tif", side=40_000)   # 40,000 x 40,000 px JPEG-tiled pyramid in a few seconds

Glass with round H&E-coloured tissue sections, written tile by tile from a generator (a handful of tiles
is encoded once and reused), so the slide never has to fit in memory.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import tifffile

H_E_MEAN = (200.0, 120.0, 170.0)  # RGB of the synthetic tissue, noise sd 25
SECTIONS = ((0.3, 0.35, 0.25), (0.72, 0.7, 0.2))  # centre x, y and radius of each section, fractions of the side


def write_pyramid(path: str | os.PathLike[str], side: int, tile: int = 512,
                  sections: Sequence[tuple[float, float, float]] = SECTIONS, mpp: float = 0.25,
                  tissue_tiles: Sequence[np.ndarray] | None = None, subifds: bool = True) -> None:
    """A side x side JPEG-tiled BigTIFF with levels 1, 1/4, 1/16 at `mpp` microns per pixel. The tissue repeats
    `tissue_tiles` (tile x tile RGB uint8, e.g. cut from a real slide) or, by default, 8 tiles of H&E-coloured
    noise. The smaller levels are SubIFDs of the first (tifffile's, QuPath's, OME-TIFF's layout), or with
    `subifds=False` successive pages (a generic tiled TIFF: the layout OpenSlide reads as a pyramid)."""
    import imagecodecs

    rng = np.random.default_rng(0)
    glass = imagecodecs.jpeg_encode(np.full((tile, tile, 3), 242, np.uint8), level=85)
    if tissue_tiles is None:
        tissue_tiles = [np.clip(rng.normal(H_E_MEAN, 25, (tile, tile, 3)), 0, 255).astype(np.uint8) for _ in range(8)]
    if any(t.shape != (tile, tile, 3) for t in tissue_tiles):
        raise ValueError(f"tissue_tiles must be {tile} x {tile} RGB")
    tissue = [imagecodecs.jpeg_encode(np.ascontiguousarray(t), level=85) for t in tissue_tiles]

    def tiles(downsample: int) -> Iterator[bytes]:
        n = -(-side // downsample // tile)
        for r in range(n):
            for c in range(n):
                cx, cy = (c + 0.5) * tile * downsample / side, (r + 0.5) * tile * downsample / side
                inside = any((cx - x) ** 2 + (cy - y) ** 2 < s ** 2 for x, y, s in sections)
                yield tissue[(r * 3 + c) % len(tissue)] if inside else glass

    common = {"dtype": np.uint8, "tile": (tile, tile), "photometric": "rgb", "compression": "jpeg"}
    per_cm = round(10_000 / mpp)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(1), shape=(side, side, 3), subifds=2 if subifds else 0, resolution=(per_cm, per_cm),
                  resolutionunit="CENTIMETER", **common)
        for ds in (4, 16):
            tif.write(tiles(ds), shape=(side // ds, side // ds, 3), subfiletype=1, **common)
