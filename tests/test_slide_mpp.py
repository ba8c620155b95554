"""A slide's microns per pixel (issue 37, item 4): the file's value first, `slide.source_mpp` only for files that
give none, and a slide table's `mpp` column for one slide, over both."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from histoflow.slides.backend import open_slide
from histoflow.slides.table import SlideTableError, read_slide_table
from histoflow.testing.cohort_fixture import write_slide_tiff


@pytest.fixture
def slides(tmp_path: Path) -> tuple[Path, Path]:
    """Two small pyramidal TIFFs: one saying 0.499 microns per pixel, one saying nothing."""
    image = np.random.default_rng(0).integers(0, 255, (600, 700, 3), dtype=np.uint8)
    return (write_slide_tiff(tmp_path / "said.tif", image, 0.499),
            write_slide_tiff(tmp_path / "unsaid.tif", image, None))


@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_source_mpp_serves_only_files_that_give_none(slides: tuple[Path, Path], backend: str) -> None:
    said, unsaid = slides
    with open_slide(said, backend, source_mpp=0.25) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)  # was 0.25: tiles twice the size, without a word
    with open_slide(unsaid, backend, source_mpp=0.25) as slide:
        assert slide.mpp == 0.25
    with open_slide(unsaid, backend) as slide:
        assert slide.mpp is None


def test_a_tables_mpp_column_wins_for_its_slide(slides: tuple[Path, Path], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("slide,patient,label,mpp,stage\nsaid.tif,P1,a,,II\nunsaid.tif,P2,b,0.5,III\n")
    said, unsaid = read_slide_table(table)
    assert (said.mpp, unsaid.mpp) == (None, 0.5)
    assert unsaid.extra == {"stage": "III"}  # the column is the record's, not an extra to copy into outputs
    with open_slide(unsaid.path, source_mpp=0.25, mpp=unsaid.mpp) as slide:
        assert slide.mpp == 0.5
    with open_slide(said.path, source_mpp=0.25, mpp=said.mpp) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
    with caplog.at_level(logging.WARNING), open_slide(said.path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
    assert "the slide table's mpp=0.25 replaces the file's 0.499" in caplog.text


def test_a_bad_mpp_cell_is_named_by_row(slides: tuple[Path, Path], tmp_path: Path) -> None:
    table = tmp_path / "cohort.csv"
    table.write_text("slide,patient,label,mpp\nsaid.tif,P1,a,0.5um\nunsaid.tif,P2,b,-1\n")
    with pytest.raises(SlideTableError) as caught:
        read_slide_table(table)
    assert "row 2: mpp '0.5um' is not microns per pixel" in str(caught.value)
    assert "row 3: mpp '-1' is not microns per pixel" in str(caught.value)
