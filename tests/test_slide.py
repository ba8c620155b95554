"""Tests for histoflow.slides.tiff_reader (region reads of SVS / tiled / plain TIFF with tifffile) and
histoflow.slides.tissue."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import measure

from histoflow.common.errors import HistoflowError
from histoflow.slides import tiff_reader as slide_module
from histoflow.slides.slide import DamagedTile, DamagedTileError, Slide, SlideError
from histoflow.slides.tiff_reader import TiffSlide
from histoflow.slides.tissue import tile_grid, tissue_mask

# (width, height) per level, as the files hold them (CMU-1-Small-Region is 2220 wide, 2967 tall)
REAL_SLIDES = {
    "cmu-1-small-region.svs": [(2220, 2967)],
    "tcga-cr-7395-01a-01-ts1.svs": [(4443, 3567), (2221, 1783)],
    "kidney-48-5.tif": [(1493, 901)],
}


def full_level(slide: Slide, level: int) -> np.ndarray:
    lv = slide.levels[level]
    return slide.read_region((0, 0), level, (lv.width, lv.height))


def check_regions(slide: Slide, level: int, reference: np.ndarray) -> None:
    """Interior, edge-straddling and outside reads all match `reference` (the whole level), padded white."""
    ds = slide.levels[level].downsample
    height, width = reference.shape[:2]
    for x, y, w, h in [(123, 77, 300, 211), (0, 0, 1, 1), (width - 50, height - 40, 50, 40)]:
        region = slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        assert region.shape == (h, w, 3) and region.dtype == np.uint8
        np.testing.assert_array_equal(region, reference[y : y + h, x : x + w])
    # 20 px beyond the right/bottom edge and 5 px above the top
    x, y = width - 10, -5
    region = slide.read_region((round(x * ds), round(y * ds)), level, (30, 20))
    np.testing.assert_array_equal(region[5:, :10], reference[:15, -10:])
    assert (region[:5] == 255).all() and (region[:, 10:] == 255).all()
    assert (slide.read_region((-10_000, -10_000), level, (8, 8)) == 255).all()


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_real_slide_levels_and_regions(wsi_dir: Path, name: str) -> None:
    path = wsi_dir / name
    with TiffSlide(path) as slide, tifffile.TiffFile(path) as tif:
        assert [(lv.width, lv.height) for lv in slide.levels] == REAL_SLIDES[name]
        assert slide.dimensions == REAL_SLIDES[name][0]
        assert slide.levels[0].downsample == 1.0
        for level in range(len(slide.levels)):
            whole = full_level(slide, level)
            # the tile-by-tile reassembly equals tifffile decoding the level at once
            np.testing.assert_array_equal(whole, tif.series[0].levels[level].asarray())
            check_regions(slide, level, whole)


def test_real_slide_metadata(wsi_dir: Path) -> None:
    with TiffSlide(wsi_dir / "cmu-1-small-region.svs") as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20.0
        assert slide.level_for_mpp(0.998) == (0, pytest.approx(2.0))
    with TiffSlide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        assert slide.mpp is None and slide.objective_power is None  # its description has neither
        assert slide.levels[1].downsample == pytest.approx(2.0, abs=1e-3)
        assert slide.best_level_for_downsample(1.0) == 0
        assert slide.best_level_for_downsample(2.0) == 1
        assert slide.best_level_for_downsample(16.0) == 1
        with pytest.raises(SlideError, match="no microns per pixel in the file.*slide.source_mpp"):
            slide.level_for_mpp(1.0)
    with TiffSlide(wsi_dir / "kidney-48-5.tif") as slide:
        assert slide.mpp is None and slide.objective_power is None


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
@pytest.mark.parametrize("max_size", [300, 1024])
def test_thumbnail_bounded_and_faithful(wsi_dir: Path, name: str, max_size: int) -> None:
    with TiffSlide(wsi_dir / name) as slide:
        thumb = slide.thumbnail(max_size)
        width, height = slide.dimensions
        assert thumb.dtype == np.uint8 and thumb.ndim == 3 and thumb.shape[2] == 3
        assert max(thumb.shape[:2]) == max_size
        assert thumb.shape[0] / thumb.shape[1] == pytest.approx(height / width, rel=0.01)
        # same picture as a plain resize of the best level (at 300 px CMU-1 would pick the label if allowed)
        expected = Image.fromarray(full_level(slide, len(slide.levels) - 1)).resize(thumb.shape[1::-1], Image.BOX)
        assert np.abs(thumb.astype(int) - np.asarray(expected, int)).mean() < 8


def off_background(thumb: np.ndarray, distance: float = 40.0) -> np.ndarray:
    """An estimate of the tissue independent of tissue_mask's saturation: the pixels farther than `distance` (RGB
    units) from the slide's own background, the median colour of the thumbnail's 4-px border (no slide here has
    tissue there), less specks under 0.05% of the thumbnail."""
    rgb = thumb.astype(np.float64)
    border = np.concatenate([rgb[:4], rgb[-4:], rgb[:, :4].swapaxes(0, 1), rgb[:, -4:].swapaxes(0, 1)], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    far = np.linalg.norm(rgb - background, axis=-1) > distance
    labels = measure.label(far)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= 0.0005 * far.size
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_tissue_mask_on_real_slides(wsi_dir: Path, name: str) -> None:
    """The mask's tissue is the slide's off-background part: a share within 20% of the estimate's (about 32% of
    CMU-1, 0.3% of the kidney slide's one small piece, 62% of the TCGA slide) and the same pixels (IoU >= 0.75)."""
    with TiffSlide(wsi_dir / name) as slide:
        thumb = slide.thumbnail(512)
    mask = tissue_mask(thumb)
    assert mask.dtype == bool and mask.shape == thumb.shape[:2]
    estimate = off_background(thumb)
    assert mask.mean() == pytest.approx(estimate.mean(), rel=0.2)
    assert (mask & estimate).sum() / (mask | estimate).sum() >= 0.75


def brute_force_grid(slide: Slide, tile: int, level: int, stride: int, mask: np.ndarray, min_tissue: float) -> set:
    """The per-tile loop tile_grid must agree with."""
    lv, (w0, h0) = slide.levels[level], slide.dimensions
    sx, sy = mask.shape[1] / w0 * lv.downsample, mask.shape[0] / h0 * lv.downsample
    kept = set()
    for y in range(0, lv.height - tile + 1, stride):
        for x in range(0, lv.width - tile + 1, stride):
            x0, y0 = min(int(np.floor(x * sx)), mask.shape[1] - 1), min(int(np.floor(y * sy)), mask.shape[0] - 1)
            x1, y1 = max(int(np.ceil((x + tile) * sx)), x0 + 1), max(int(np.ceil((y + tile) * sy)), y0 + 1)
            if mask[y0:y1, x0:x1].mean() >= min_tissue:
                kept.add((round(x * lv.downsample), round(y * lv.downsample)))
    return kept


@pytest.mark.parametrize(("level", "tile", "stride"), [(0, 256, 256), (0, 224, 112), (1, 64, 48)])
def test_tile_grid_real_slide(wsi_dir: Path, level: int, tile: int, stride: int) -> None:
    with TiffSlide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        mask = tissue_mask(slide.thumbnail(512))
        grid = tile_grid(slide, tile, level=level, stride=stride, mask=mask)
        lv = slide.levels[level]
        assert grid.ndim == 2 and grid.shape[1] == 2 and len(grid) > 0 and grid.dtype.kind == "i"
        in_level = np.round(grid / lv.downsample).astype(int)
        assert (in_level % stride == 0).all()
        assert (in_level >= 0).all()
        assert (in_level[:, 0] + tile <= lv.width).all() and (in_level[:, 1] + tile <= lv.height).all()
        assert set(map(tuple, grid.tolist())) == brute_force_grid(slide, tile, level, stride, mask, 0.5)
        # the origins read back exactly the grid cell at that level
        middle = len(grid) // 2
        lx, ly = in_level[middle]
        expected = full_level(slide, level)[ly : ly + tile, lx : lx + tile]
        np.testing.assert_array_equal(slide.read_region(tuple(grid[middle]), level, (tile, tile)), expected)
        # more tissue demanded, fewer tiles; the default mask comes from the thumbnail
        assert len(tile_grid(slide, tile, level=level, stride=stride, mask=mask, min_tissue=0.95)) <= len(grid)
        assert len(tile_grid(slide, tile, level=level, stride=stride)) > 0


# --- synthetic TIFFs ------------------------------------------------------------------------


def pattern(height: int, width: int) -> np.ndarray:
    """A deterministic RGB image where every pixel differs from its neighbours."""
    ys, xs = np.mgrid[:height, :width]
    return np.stack([(xs * 7 + ys) % 256, (ys * 5 + xs * 3) % 256, (xs ^ ys) % 256], axis=-1).astype(np.uint8)


def tiles_of(image: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Yield `image` tile by tile, zero-padded, as a scanner writes a slide."""
    for y in range(0, image.shape[0], tile):
        for x in range(0, image.shape[1], tile):
            block = np.zeros((tile, tile, 3), np.uint8)
            part = image[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            yield block


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("slides") / "pyramid.tif"
    base = pattern(2048, 1900)  # width not a tile multiple: padded edge tiles
    half = np.asarray(Image.fromarray(base).resize((950, 1024), Image.BOX))
    common = {"dtype": np.uint8, "tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path) as tif:
        resolution = {"resolution": (40000, 40000), "resolutionunit": "CENTIMETER"}
        tif.write(tiles_of(base, 256), shape=base.shape, subifds=1, **resolution, **common)
        tif.write(tiles_of(half, 256), shape=half.shape, subfiletype=1, **common)
    return path, [base, half]


def test_synthetic_pyramid(pyramid_tiff: tuple[Path, list[np.ndarray]]) -> None:
    path, images = pyramid_tiff
    with TiffSlide(path) as slide:
        assert [(lv.width, lv.height) for lv in slide.levels] == [(1900, 2048), (950, 1024)]
        assert slide.levels[1].downsample == 2.0
        assert slide.mpp == pytest.approx(0.25)  # 40000 px/cm
        assert slide.objective_power is None
        assert slide.level_for_mpp(1.0) == (1, pytest.approx(2.0))
        assert slide.level_for_mpp(0.5) == (1, pytest.approx(1.0))
        for level, image in enumerate(images):
            np.testing.assert_array_equal(full_level(slide, level), image)
            check_regions(slide, level, image)
        assert max(slide.thumbnail(600).shape[:2]) == 600


@pytest.mark.parametrize(
    "options",
    [
        {"rowsperstrip": 16, "compression": "zlib"},
        {"rowsperstrip": 7, "compression": "zlib", "planarconfig": "separate"},
        {"rowsperstrip": 64},  # uncompressed: memory-mapped
    ],
    ids=["zlib-strips", "planar-separate", "uncompressed"],
)
def test_synthetic_strip_tiffs(tmp_path: Path, options: dict) -> None:
    image = pattern(301, 437)
    path = tmp_path / "strips.tif"
    data = np.moveaxis(image, -1, 0) if options.get("planarconfig") == "separate" else image
    tifffile.imwrite(path, data, photometric="rgb", resolution=(72, 72), resolutionunit="INCH", **options)
    with TiffSlide(path) as slide:
        assert slide.dimensions == (437, 301)
        assert slide.mpp is None  # 72 dpi is a software default, not a scan resolution
        np.testing.assert_array_equal(full_level(slide, 0), image)
        check_regions(slide, 0, image)


def test_grayscale_tiff(tmp_path: Path) -> None:
    image = pattern(100, 120)[..., 0]
    tifffile.imwrite(tmp_path / "gray.tif", image, tile=(32, 32))
    with TiffSlide(tmp_path / "gray.tif") as slide:
        np.testing.assert_array_equal(slide.read_region((5, 6), 0, (40, 30)), np.repeat(image[6:36, 5:45, None], 3, -1))


def test_huge_pyramid_reads_stay_small(tmp_path: Path) -> None:
    """A 40,000 x 40,000 slide (4.8 GB decoded): a region read decodes a few tiles, never the level."""
    tile, side = 256, 40_000
    encoded = {v: zlib.compress(np.full((tile, tile, 3), v, np.uint8).tobytes()) for v in range(251)}

    def tiles(n: int) -> Iterator[bytes]:  # pre-compressed tiles keep writing fast
        count = -(-n // tile)
        for r in range(count):
            for c in range(count):
                yield encoded[(r * 7 + c * 13) % 251]

    path = tmp_path / "huge.tif"
    common = {"dtype": np.uint8, "tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(side), shape=(side, side, 3), subifds=1, **common)
        tif.write(tiles(side // 4), shape=(side // 4, side // 4, 3), subfiletype=1, **common)
    with TiffSlide(path) as slide:
        assert slide.dimensions == (side, side) and slide.levels[1].downsample == 4.0
        tracemalloc.start()
        try:
            region = slide.read_region((20_000, 30_000), 0, (1000, 1000))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20e6  # the region is 3 MB, the level 4.8 GB
        ys, xs = np.mgrid[30_000:31_000, 20_000:21_000]
        np.testing.assert_array_equal(region[..., 0], ((ys // tile) * 7 + (xs // tile) * 13) % 251)


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    white = np.full((1024, 1024, 3), 255, np.uint8)
    tifffile.imwrite(tmp_path / "white.tif", white, tile=(256, 256), photometric="rgb", compression="zlib")
    with TiffSlide(tmp_path / "white.tif") as slide:
        assert not tissue_mask(slide.thumbnail(256)).any()
        assert tile_grid(slide, 128).shape == (0, 2)
    rng = np.random.default_rng(0)
    noisy_glass = (255 - rng.integers(0, 6, (200, 200, 3))).astype(np.uint8)
    assert not tissue_mask(noisy_glass).any()  # Otsu would split the noise; the floor stops it


def test_tissue_mask_finds_a_stained_blob() -> None:
    image = np.full((200, 300, 3), 245, np.uint8)
    image[50:150, 100:220] = (180, 60, 140)  # eosin-pink
    image[90:92, 150:152] = 245  # a small hole, filled
    image[10, 10] = (180, 60, 140)  # a speck, removed
    mask = tissue_mask(image)
    expected = np.zeros((200, 300), bool)
    expected[50:150, 100:220] = True
    np.testing.assert_array_equal(mask, expected)
    assert tissue_mask(image, min_saturation=0.99).sum() == 0


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.svs"):
        TiffSlide(tmp_path / "nowhere.svs")
    (tmp_path / "notes.svs").write_text("not a slide")
    with pytest.raises(SlideError, match="notes.svs.*not a TIFF"):
        TiffSlide(tmp_path / "notes.svs")
    tifffile.imwrite(tmp_path / "small.tif", pattern(20, 30))
    with TiffSlide(tmp_path / "small.tif") as slide, pytest.raises(IndexError, match="level 3"):
        slide.read_region((0, 0), 3, (10, 10))


def test_missing_jpeg2000_codec_says_how_to_fix(wsi_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slide_module, "has_decoder", lambda compression: compression != 33005)
    with pytest.raises(SlideError, match="JPEG 2000.*pip install imagecodecs"):
        TiffSlide(wsi_dir / "tcga-cr-7395-01a-01-ts1.svs")


def test_decoded_tile_cache_is_exact_and_bounded(wsi_dir: Path) -> None:
    """Reads through the decoded-tile cache equal uncached reads; a repeated read decodes nothing new;
    the cache never holds more than its budget."""
    path = wsi_dir / "tcga-cr-7395-01a-01-ts1.svs"  # 256-px JPEG 2000 tiles
    budget = 40 * 256 * 256 * 3  # forty tiles
    with TiffSlide(path, cache_bytes=budget) as cached, TiffSlide(path, cache_bytes=0) as plain:
        reads = []
        real_read = cached._read_bytes
        cached._read_bytes = lambda offset, count: reads.append(offset) or real_read(offset, count)  # type: ignore[method-assign]
        regions = [((x, y), (224, 224)) for y in range(0, 1400, 224) for x in range(0, 2000, 224)]
        for location, size in regions:
            np.testing.assert_array_equal(cached.read_region(location, 0, size), plain.read_region(location, 0, size))
            assert cached._cache.currsize <= budget
        first_pass = len(reads)
        # 224-px reads over 256-px tiles share tiles: without the cache ~1.9 decodes per stored tile under the grid
        assert first_pass <= len(set(reads)) * 1.2
        cached.read_region(regions[-1][0], 0, (224, 224))
        assert len(reads) == first_pass  # the last region's tiles are still cached


# --- damaged and truncated files ------------------------------------------------------------------


def write_jpeg_slide(path: Path, side: int = 2048) -> None:
    """A JPEG-tiled two-level pyramid (256-px tiles, level 1 a quarter the side) of a pink disk of tissue on glass."""
    ys, xs = np.mgrid[:side, :side]
    image = np.full((side, side, 3), 242, np.uint8)
    image[(xs - 0.45 * side) ** 2 + (ys - 0.45 * side) ** 2 < (0.35 * side) ** 2] = (200, 120, 170)
    small = np.asarray(Image.fromarray(image).resize((side // 4, side // 4), Image.BOX))
    common = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, **common)
        tif.write(small, subfiletype=1, **common)


def zero_stored_tile(path: Path, row: int, col: int) -> None:
    """Overwrite level 0's stored tile at (row, col) with zero bytes, as a failed disk or copy leaves it."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        index = row * -(-page.imagewidth // page.tilewidth) + col
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(count))


@pytest.fixture(scope="module")
def damaged_jpeg_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """write_jpeg_slide's slide with its level-0 tile at row 1, column 1 zeroed."""
    path = tmp_path_factory.mktemp("damaged") / "damaged.tif"
    write_jpeg_slide(path)
    zero_stored_tile(path, 1, 1)
    return path


def test_damaged_tile_names_the_slide_level_and_tile(damaged_jpeg_slide: Path) -> None:
    """A region over a zeroed JPEG tile raises the project's error naming the file, level, tile and fix; every tile
    the region overlaps is tried, and regions beside it still read."""
    with TiffSlide(damaged_jpeg_slide) as slide:
        with pytest.raises(DamagedTileError) as caught:
            slide.read_region((200, 200), 0, (100, 100))
        message = str(caught.value)
        assert isinstance(caught.value, HistoflowError)  # printed without a traceback by the entry points
        assert message.startswith(f"{damaged_jpeg_slide}: level 0, stored tile row 1 col 1 (pixel x 256, y 256)")
        assert "Jpeg8Error" in message and "re-export the slide" in message and "on_bad_image=skip" in message
        assert caught.value.tiles == [DamagedTile(0, 1, 1, 256, 256, caught.value.tiles[0].reason)]
        assert slide.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)  # its neighbour is fine
        with pytest.raises(DamagedTileError, match="level 0, stored tile row 1 col 1"):
            slide.read_region((0, 0), 0, (2048, 2048))
        assert slide.thumbnail(512).shape == (512, 512, 3)  # level 1 is whole


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif"])
@pytest.mark.parametrize("kept", [0.5, 0.95])
def test_truncated_slide_is_reported_as_truncated(wsi_dir: Path, tmp_path: Path, name: str, kept: float) -> None:
    """A slide cut short (an interrupted copy) says so, with its size, not 'holds no image' or a decoder error."""
    data = (wsi_dir / name).read_bytes()
    cut = tmp_path / name
    size = int(len(data) * kept)
    cut.write_bytes(data[:size])
    with pytest.raises(SlideError, match=rf"{cut.name}: the file is truncated: it has {size:,} bytes"
                                         r" but its TIFF directories need [\d,]+\. Fix: copy or download the slide"):
        TiffSlide(cut)
