"""The viewer's deep-zoom tiles of an OpenSlide-backed slide are OpenSlide's own: `DeepZoomGenerator` with the same
tile size and overlap gives the same pixels, at every deep-zoom level, on the real slides of ../shared/data/wsi (the
CMU slide has one level, so every level below full resolution is a shrink; the TCGA slide's second level has
downsample 2.0005, which OpenSlide does not read for 2x). Skipped without the slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoflow.slides.backend import open_slide
from histoflow.viewer.deepzoom import OVERLAP, TILE_SIZE, DeepZoom

openslide = pytest.importorskip("openslide")
deepzoom = pytest.importorskip("openslide.deepzoom")


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"])
def test_deep_zoom_tiles_are_openslides(wsi_dir: Path, name: str) -> None:
    path = wsi_dir / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    reference = deepzoom.DeepZoomGenerator(openslide.OpenSlide(path), tile_size=TILE_SIZE, overlap=OVERLAP)
    with open_slide(path, "openslide") as slide:
        zoom = DeepZoom(slide)
        assert zoom.level_count == reference.level_count
        assert zoom.level_dimensions == list(reference.level_dimensions)
        assert zoom.level_tiles == list(reference.level_tiles)
        compared = 0
        for level in range(zoom.level_count):
            cols, rows = zoom.level_tiles[level]
            # corners, an inner tile (overlap on all four sides) and the last (clipped at the slide's edge)
            for col, row in {(0, 0), (min(1, cols - 1), min(1, rows - 1)), (cols // 2, rows // 2), (cols - 1, 0),
                             (0, rows - 1), (cols - 1, rows - 1)}:
                expected = np.asarray(reference.get_tile(level, (col, row)).convert("RGB"))
                np.testing.assert_array_equal(zoom.tile_pixels(level, col, row), expected,
                                              err_msg=f"{name}: level {level}, tile {col}_{row}")
                compared += 1
        assert compared > zoom.level_count + 10  # the levels of more than one tile: several compared
