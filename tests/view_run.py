"""A small run for the viewer's tests: a synthetic pyramidal TIFF slide (tissue on its left half, glass on its right)
and a prediction's output over it as deployment/slide_map.py writes it, with a map whose tumour probability is high
on the tissue's top half and low on its bottom half."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from histoflow.testing.cohort_fixture import write_slide_tiff

WIDTH, HEIGHT, TILE = 2048, 1536, 256
TISSUE = np.array([214, 120, 170])  # H&E-like pink
CLASSES = ["NORM", "TUM"]
HIGH, LOW = 0.95, 0.05


def slide_pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    texture = rng.integers(-12, 13, (HEIGHT, WIDTH // 2, 3))
    image[:, : WIDTH // 2] = np.clip(TISSUE + texture, 0, 255)
    return image


def tumour_probability() -> np.ndarray:
    """(rows, cols) P(TUM) per grid cell: NaN on glass, HIGH on the tissue's top half, LOW on its bottom half."""
    rows, cols = HEIGHT // TILE, WIDTH // TILE
    grid = np.full((rows, cols), np.nan, np.float32)
    grid[: rows // 2, : cols // 2] = HIGH
    grid[rows // 2 :, : cols // 2] = LOW
    return grid


def write_prediction(folder: Path, slide: Path) -> Path:
    """<folder>/slides.csv and slides/<stem>.{json,map.npy,tiles.csv} as `histoflow predict slides=...` writes them."""
    out = folder / "slides"
    out.mkdir(parents=True)
    tum = tumour_probability()
    prob = np.stack([1 - tum, tum], axis=-1)
    np.save(out / f"{slide.stem}.map.npy", prob)
    rows, cols = np.nonzero(~np.isnan(tum))
    with (out / f"{slide.stem}.tiles.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "row", "col", "predicted", *(f"prob_{c}" for c in CLASSES)])
        for r, c in zip(rows, cols):
            p = prob[r, c]
            writer.writerow([c * TILE, r * TILE, r, c, CLASSES[int(p.argmax())], *(f"{v:.6f}" for v in p)])
    geometry = {"level": 0, "downsample": 1.0, "read_size": TILE, "read_stride": TILE, "tile_size": TILE,
                "rows": tum.shape[0], "cols": tum.shape[1]}
    mean = np.nanmean(prob.reshape(-1, 2), axis=0)
    (out / f"{slide.stem}.json").write_text(json.dumps({
        "slide": str(slide), "dimensions": [WIDTH, HEIGHT], "mpp": 0.25, "classes": CLASSES, "geometry": geometry,
        "tiles": int(len(rows)), "heatmap_class": "TUM", "mean_probability": dict(zip(CLASSES, mean.tolist())),
        "files": {"csv": f"{slide.stem}.tiles.csv", "map": f"{slide.stem}.map.npy",
                  "heatmap": f"{slide.stem}.heatmap.png"}}))
    with (folder / "slides.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", "label", "tiles"])
        writer.writerow([str(slide), "P1", "TUM", len(rows)])
    (folder / "report.md").write_text("# Slide prediction\n\n| slide | tiles |\n|---|---|\n"
                                      f"| {slide.stem} | {len(rows)} |\n")
    return folder


def make_run(root: Path) -> tuple[Path, Path]:
    """(the run folder, its slide) under `root`."""
    (root / "slides_in").mkdir(parents=True)
    slide = write_slide_tiff(root / "slides_in" / "synthetic.tif", slide_pixels(), mpp=0.25, compression="zlib")
    return write_prediction(root / "run", slide), slide
