"""One slide interface, two backends: OpenSlide (every vendor format it reads) and histoflow's tifffile reader (what
OpenSlide refuses). The same regions, levels and microns per pixel through both on the real slides; a pyramidal
TIFF written here from real slide pixels read by OpenSlide as a generic tiled TIFF; damaged and truncated copies
give histoflow's errors under OpenSlide too; `auto` falls back to tifffile for a plain TIFF; source_mpp supplies
a resolution a file lacks; a DICOM slide made from a real one reads through OpenSlide."""

from __future__ import annotations

import ctypes.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histoflow.common.errors import ConfigError
from histoflow.slides import backend as backends
from histoflow.slides.backend import open_slide
from histoflow.slides.openslide_reader import OpenSlideSlide, UnsupportedByOpenSlide
from histoflow.slides.slide import DamagedTileError, SlideError, SlideSettingError
from histoflow.slides.tiff_reader import TiffSlide
from histoflow.slides.tiles import SlideTiles, TileGeometry, tile_loader, tissue_tiles

CMU, TCGA, PLAIN = "cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif"


@pytest.mark.parametrize("name", [CMU, TCGA])  # JPEG and JPEG 2000 tiles
def test_both_backends_read_the_same_slide(wsi_dir: Path, name: str) -> None:
    with open_slide(wsi_dir / name, "openslide") as ours, open_slide(wsi_dir / name, "tifffile") as theirs:
        assert isinstance(ours, OpenSlideSlide) and isinstance(theirs, TiffSlide)
        assert [(lv.width, lv.height) for lv in ours.levels] == [(lv.width, lv.height) for lv in theirs.levels]
        assert [lv.downsample for lv in ours.levels] == pytest.approx([lv.downsample for lv in theirs.levels])
        assert ours.mpp == theirs.mpp  # CMU 0.499; TCGA's file gives none in either
        for location in [(0, 0), (1000, 700), (2000, 2500)]:  # level 0: the same decoded pixels
            a, b = ours.read_region(location, 0, (300, 200)), theirs.read_region(location, 0, (300, 200))
            assert a.shape == b.shape == (200, 300, 3)
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # JPEG decoders may differ by a unit
        if len(ours.levels) > 1:  # OpenSlide places a level-1 read to a fraction of a pixel (downsample 2.0005)
            a, b = ours.read_region((1000, 1000), 1, (256, 256)), theirs.read_region((1000, 1000), 1, (256, 256))
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 4
        outside = ours.read_region((ours.dimensions[0] - 50, 0), 0, (100, 10))
        assert (outside[:, 50:] == 255).all()  # beyond the slide: white, as the tifffile reader gives it
        thumb_a, thumb_b = ours.thumbnail(256), theirs.thumbnail(256)
        assert thumb_a.shape == thumb_b.shape
        assert np.abs(thumb_a.astype(int) - thumb_b.astype(int)).mean() < 8  # tifffile may use the stored thumbnail


def test_associated_images_through_both_backends(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / CMU, "openslide") as ours, open_slide(wsi_dir / CMU, "tifffile") as theirs:
        a, b = ours.associated_images(), theirs.associated_images()
    assert {"label", "macro", "thumbnail"} <= set(a) and set(a) == set(b)
    for name in a:
        assert a[name].dtype == np.uint8 and a[name].shape == b[name].shape and a[name].shape[2] == 3


def test_auto_reads_with_openslide_and_falls_back_for_a_plain_tiff(wsi_dir: Path, caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` says once per slide which reader it took, not at every open (loader workers reopen the slide)."""
    monkeypatch.setattr(backends, "_said", set())
    assert isinstance(open_slide(wsi_dir / CMU, "auto"), OpenSlideSlide)
    with caplog.at_level(logging.INFO, logger="histoflow.slides.backend"):
        plain = open_slide(wsi_dir / PLAIN, "auto")
        again = open_slide(wsi_dir / PLAIN, "auto")
    assert isinstance(plain, TiffSlide) and plain.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)
    assert isinstance(again, TiffSlide)
    said = f"{wsi_dir / PLAIN}: Unsupported or missing image file; read with tifffile instead"
    assert caplog.text.count(said) == 1
    with pytest.raises(UnsupportedByOpenSlide, match=r"OpenSlide does not read it .*Fix: slide.backend=auto"):
        open_slide(wsi_dir / PLAIN, "openslide")
    with pytest.raises(ConfigError, match="slide.backend='vips': expected one of auto, openslide, tifffile"):
        open_slide(wsi_dir / CMU, "vips")


def pyramid_from_real_pixels(wsi_dir: Path, path: Path, side: int = 2048) -> np.ndarray:
    """A two-level JPEG-tiled pyramidal TIFF (levels as successive pages, 256-px tiles, 0.499 microns per pixel)
    of a real slide's pixels; returns level 0."""
    with open_slide(wsi_dir / CMU, "tifffile") as slide:
        image = slide.read_region((0, 0), 0, (side, side))
    small = np.asarray(Image.fromarray(image).resize((side // 2, side // 2), Image.Resampling.BOX))
    with tifffile.TiffWriter(path) as tif:
        for level, pixels in enumerate((image, small)):
            tif.write(pixels, tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=level and 1,
                      resolution=(1e4 / 0.499, 1e4 / 0.499), resolutionunit="CENTIMETER")
    return image


def test_a_pyramidal_tiff_of_real_pixels_reads_through_openslide(wsi_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "pyramid.tif"
    pyramid_from_real_pixels(wsi_dir, path)
    with open_slide(path, "auto") as ours, open_slide(path, "tifffile") as theirs:
        assert isinstance(ours, OpenSlideSlide)  # a generic tiled TIFF to OpenSlide
        assert [lv.downsample for lv in ours.levels] == [1.0, 2.0] and ours.mpp == pytest.approx(0.499)
        for level in (0, 1):
            a, b = ours.read_region((512, 768), level, (400, 300)), theirs.read_region((512, 768), level, (400, 300))
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert ours.level_for_mpp(0.998) == (1, pytest.approx(1.0))


def test_damaged_and_truncated_copies_give_histoflows_errors_under_openslide(wsi_dir: Path, tmp_path: Path) -> None:
    """A zeroed stored tile is named (level, row, column, pixel) as the tifffile reader names it, and the slide
    still reads beside it; a copy cut short names the slide and the fix."""
    path = tmp_path / "pyramid.tif"
    pyramid_from_real_pixels(wsi_dir, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = 3 * (page.imagewidth // page.tilewidth) + 2  # row 3, column 2
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(count)
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(bytes(data))
    for backend in ("openslide", "tifffile"):
        with open_slide(damaged, backend) as slide:
            with pytest.raises(DamagedTileError) as caught:
                slide.read_region((400, 700), 0, (300, 200))
            assert [(t.level, t.row, t.col, t.x, t.y) for t in caught.value.tiles] == [(0, 3, 2, 512, 768)]
            assert f"{damaged}: level 0, stored tile row 3 col 2 (pixel x 512, y 768)" in str(caught.value)
            assert slide.read_region((1024, 1024), 0, (256, 256)).shape == (256, 256, 3)  # beside it: read

    cut = tmp_path / "cut.svs"
    cut.write_bytes((wsi_dir / CMU).read_bytes()[: (wsi_dir / CMU).stat().st_size // 2])
    for backend in ("openslide", "auto"):
        with pytest.raises(SlideError, match=rf"{cut}: the file is truncated.*Fix: copy or download the slide again"):
            open_slide(cut, backend)


def test_source_mpp_supplies_a_resolution_the_file_lacks(wsi_dir: Path) -> None:
    for backend in ("openslide", "tifffile"):
        with open_slide(wsi_dir / TCGA, backend) as slide:
            with pytest.raises(SlideSettingError, match="no microns per pixel in the file.*Fix: slide.source_mpp="):
                slide.level_for_mpp(0.5)
        with open_slide(wsi_dir / TCGA, backend, source_mpp=0.25) as slide:
            assert slide.mpp == 0.25 and slide.level_for_mpp(0.5) == (1, pytest.approx(1.0, abs=1e-3))
    with pytest.raises(ConfigError, match="slide.source_mpp=0: microns per pixel must be positive"):
        open_slide(wsi_dir / TCGA, "openslide", source_mpp=0)


def test_tiles_read_in_loader_workers_through_openslide(wsi_dir: Path) -> None:
    """Each loader worker opens its own OpenSlide handle; the tiles equal the tifffile reader's."""
    with open_slide(wsi_dir / CMU, "openslide") as slide:
        geometry = TileGeometry.of(slide, 128)
        origins = tissue_tiles(slide, geometry, min_tissue=0.5)[:40]
    batches = {}
    for backend in ("openslide", "tifffile"):
        tiles = SlideTiles(wsi_dir / CMU, origins, geometry, batch_size=8, backend=backend)
        batches[backend] = {index: batch for index, batch, damaged in tile_loader(tiles, num_workers=2)}
    assert len(batches["openslide"]) == 5
    for index, batch in batches["openslide"].items():
        assert np.abs(batch.astype(int) - batches["tifffile"][index].astype(int)).max() <= 2


def test_auto_keeps_a_subifd_pyramid_that_openslide_sees_as_one_level(wsi_dir: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """tifffile, QuPath and OME-TIFF write pyramids as SubIFDs, of which OpenSlide 4 reads only level 0: `auto`
    reads such a file with tifffile, so its levels (and slide.level / slide.mpp reads at them) are not lost."""
    monkeypatch.setattr(backends, "_said", set())
    with open_slide(wsi_dir / CMU, "tifffile") as slide:
        image = slide.read_region((0, 0), 0, (1024, 1024))
    path = tmp_path / "subifds.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, tile=(256, 256), photometric="rgb", compression="jpeg")
        tif.write(image[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb", compression="jpeg")
    assert len(open_slide(path, "openslide").levels) == 1
    with caplog.at_level(logging.INFO, logger="histoflow.slides.backend"):
        slide = open_slide(path, "auto")
    assert isinstance(slide, TiffSlide) and [lv.downsample for lv in slide.levels] == [1.0, 2.0]
    assert "OpenSlide sees one level, tifffile 2 (a SubIFD pyramid)" in caplog.text
    assert isinstance(open_slide(wsi_dir / CMU, "auto"), OpenSlideSlide)  # one level to both: OpenSlide


def test_a_dicom_slide_made_from_a_real_one_reads_through_openslide(wsi_dir: Path, tmp_path: Path) -> None:
    """The real SVS converted to DICOM WSI by wsidicomizer (its JPEG tiles passed through) reads through OpenSlide
    (`auto` picks it) with the same levels, microns per pixel and pixels as the SVS through tifffile."""
    dicomizer = pytest.importorskip("wsidicomizer", reason="pip install wsidicomizer (in the [test] extra)")
    if not (os.environ.get("TURBOJPEG") or ctypes.util.find_library("turbojpeg")):
        pytest.skip("wsidicomizer needs libjpeg-turbo's libturbojpeg, absent here: apt install libturbojpeg0, or "
                    "TURBOJPEG=<path to libturbojpeg.so>")
    (dicom,) = dicomizer.WsiDicomizer.convert(wsi_dir / CMU, tmp_path, include_label=False, include_overview=False,
                                              include_thumbnail=False, workers=1)
    with open_slide(dicom, "auto") as ours, open_slide(wsi_dir / CMU, "tifffile") as theirs:
        assert isinstance(ours, OpenSlideSlide)
        assert [(lv.width, lv.height) for lv in ours.levels] == [(lv.width, lv.height) for lv in theirs.levels]
        assert ours.mpp == pytest.approx(theirs.mpp, abs=1e-3)
        a, b = ours.read_region((500, 700), 0, (256, 256)), theirs.read_region((500, 700), 0, (256, 256))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
