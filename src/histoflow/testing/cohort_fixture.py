"""A cohort of real tissue for tests and benchmarks: pyramidal TIFFs cut from the real slides of ../shared/data/wsi,
each labelled by the slide it comes from, with made-up patients (several slides each), and its slide table.

    table = build_cohort(wsi_dir, out, per_source=4, side=512)   # 12 small slides, out/cohort.csv

The three real slides are too few to be a cohort, so each cohort slide is a region of one of them, at a seeded
random place among those with the most tissue, turned by a seeded multiple of 90 degrees and mirrored, so no two
are alike. Each is written as a JPEG-tiled BigTIFF with its levels (1, 1/2, 1/4, ... down to one tile) as SubIFDs
and its microns per pixel in the resolution tags: the source's where it has one (CMU-1: 0.499), else `mpp`.
Regions of kidney-48-5 hold little tissue (one small fragment on glass), as such slides do.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

from histoflow.common.files import atomic_path
from histoflow.slides.backend import open_slide
from histoflow.slides.tissue import tissue_mask

# source file -> label; its patients are <label prefix>-P<n>
SOURCES = {"cmu-1-small-region.svs": "skin", "tcga-cr-7395-01a-01-ts1.svs": "tcga", "kidney-48-5.tif": "kidney"}
STORED_TILE = 256  # px of the stored JPEG tiles
CANDIDATES = 24  # random region places weighed per slide; the one with most tissue among a seeded few is taken


def write_slide_tiff(path: str | os.PathLike[str], image: np.ndarray, mpp: float | None, quality: int = 90,
                     compression: str = "jpeg") -> Path:
    """An (H, W, 3) uint8 image as a tiled pyramidal BigTIFF: level 0 and SubIFDs halving down to one tile, `mpp`
    microns per pixel in the resolution tags (none when None); JPEG tiles at `quality`, or lossless ones
    (compression="zlib"). Written to a temporary name, then renamed."""
    path = Path(path)
    levels = [np.ascontiguousarray(image)]
    while max(levels[-1].shape[:2]) > STORED_TILE:
        h, w = levels[-1].shape[:2]
        cut = levels[-1][:h // 2 * 2, :w // 2 * 2].astype(np.float32)
        levels.append(((cut[0::2, 0::2] + cut[1::2, 0::2] + cut[0::2, 1::2] + cut[1::2, 1::2]) / 4 + 0.5)
                      .astype(np.uint8))
    common = {"tile": (STORED_TILE, STORED_TILE), "photometric": "rgb", "compression": compression,
              "compressionargs": {"level": quality} if compression == "jpeg" else None}
    resolution = {} if mpp is None else {"resolution": (10_000 / mpp, 10_000 / mpp), "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, **resolution, **common)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **common)
    return path


def _region(source: np.ndarray, mask: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A side x side region (smaller where the source is) of `source` with much tissue under `mask` (the source's
    tissue mask at any scale): the best of a seeded draw of places."""
    h, w = source.shape[:2]
    rh, rw = min(side, h), min(side, w)
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    best, best_tissue = (0, 0), -1.0
    for _ in range(CANDIDATES):
        y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        window = mask[int(y * sy):max(int((y + rh) * sy), int(y * sy) + 1),
                      int(x * sx):max(int((x + rw) * sx), int(x * sx) + 1)]
        tissue = float(window.mean()) + float(rng.uniform(0, 0.05))  # a little chance, so regions differ
        if tissue > best_tissue:
            best, best_tissue = (y, x), tissue
    y, x = best
    region = source[y:y + rh, x:x + rw]
    region = np.rot90(region, int(rng.integers(0, 4)))
    return np.ascontiguousarray(region[:, ::-1] if rng.random() < 0.5 else region)


def build_cohort(wsi_dir: str | os.PathLike[str], out: str | os.PathLike[str], per_source: int = 4,
                 side: int = 512, slides_per_patient: int = 2, mpp: float = 0.5, seed: int = 0,
                 sources: Sequence[str] = tuple(SOURCES)) -> Path:
    """`per_source` slides of `side` px cut from each source slide of `wsi_dir` into out/slides/, and the slide
    table out/cohort.csv (slide,patient,label,source): label the source's (SOURCES), every `slides_per_patient`
    slides of a source one made-up patient. Returns the table's path."""
    wsi_dir, out = Path(wsi_dir), Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rows = [["slide", "patient", "label", "source"]]
    rng = np.random.default_rng(seed)
    for name in sources:
        label = SOURCES[name]
        with open_slide(wsi_dir / name, backend="tifffile") as slide:
            width, height = slide.dimensions
            image = slide.read_region((0, 0), 0, (width, height))
            source_mpp = slide.mpp
            mask = tissue_mask(slide.thumbnail(512))
        for i in range(per_source):
            file = out / "slides" / f"{label}-{i:02d}.tif"
            write_slide_tiff(file, _region(image, mask, side, rng), round(source_mpp or mpp, 3))
            rows.append([f"slides/{file.name}", f"{label}-P{i // slides_per_patient + 1}", label, name])
    table = out / "cohort.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return table
