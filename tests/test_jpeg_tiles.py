"""Stored JPEG tiles decoded where the model runs (slides/jpeg_tiles.py, slide.decode): on the CPU here, the same code
path as on a GPU. The tiles equal the reader's on the real CMU slide (Aperio: RGB samples, no JFIF or Adobe marker)
and on pyramidal TIFFs written from its pixels in RGB and YCbCr, for grid tiles straddling the 240-px stored tiles;
resized grids within a grey level of the reader's box filter; predictions alike with slide.decode=device and cpu."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from test_slide import zero_stored_tile
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg

from histoflow.common.errors import ConfigError
from histoflow.data.transforms import PatchTransform
from histoflow.deployment.slide_map import SlideConfig, predict_slide
from histoflow.slides.backend import open_slide
from histoflow.slides.jpeg_tiles import JpegLevel, box_weights, resize_tiles
from histoflow.slides.tiles import SlideTiles, TileGeometry, tile_loader

CMU = "cmu-1-small-region.svs"  # JPEG tiles 240 px, one level, 2220 x 2967
TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # JPEG 2000 tiles
DECODER_TOLERANCE = 1  # grey levels between the device's decode and the reader's; measured 0 on this CPU (both
#                        libjpeg-turbo's integer IDCT); the GPU check measures nvJPEG's
RESIZE_TOLERANCE = 1  # grey levels between resize_tiles and PIL's BOX (the reader's): measured 0 (float32 sums can
#                      fall on the other side of a half where Pillow's fixed point does not)
CPU = torch.device("cpu")


def grid_origins(width: int, height: int, size: int, n: int, seed: int = 0) -> np.ndarray:
    """n level-0 origins of size-px tiles, most straddling stored 240-px tiles, one at the level's far corner."""
    rng = np.random.default_rng(seed)
    xy = np.stack([rng.integers(0, width - size, n), rng.integers(0, height - size, n)], 1)
    xy[0] = (width - size, height - size)
    xy[1] = (239, 239)  # a 240-px stored tile's last pixel: the tile spans four
    return xy


def device_and_reader(path: Path, origins: np.ndarray, geometry: TileGeometry, backend: str,
                      workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The tiles at `origins` decoded from the stored JPEG bytes (slide.decode=device on the CPU), and the reader's."""
    on_device = SlideTiles(path, origins, geometry, 16, backend=backend, decode="device", device=CPU)
    assert on_device.jpeg is not None
    got = np.empty((len(origins), geometry.tile_size, geometry.tile_size, 3), np.uint8)
    for index, batch, damaged in tile_loader(on_device, workers):
        assert not damaged and batch.device == CPU and batch.dtype == torch.uint8
        got[index * 16:index * 16 + len(batch)] = batch.numpy()
    reader = SlideTiles(path, origins, geometry, 16, backend=backend, decode="cpu")
    assert reader.jpeg is None
    return got, reader.read(origins)


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
@pytest.mark.parametrize("size", [224, 256])
def test_stored_jpeg_tiles_of_the_real_slide_equal_the_readers(wsi_dir: Path, backend: str, size: int) -> None:
    path = wsi_dir / CMU
    with open_slide(path, backend) as slide:
        geometry = TileGeometry.of(slide, size)
        origins = grid_origins(*slide.dimensions, size, 40)
    got, expected = device_and_reader(path, origins, geometry, backend, workers=1 if size == 256 else 0)
    assert np.abs(got.astype(int) - expected).max() <= DECODER_TOLERANCE
    assert got.std() > 10  # tissue, not a white page


def test_aperio_rgb_tiles_need_the_adobe_marker(wsi_dir: Path) -> None:
    """Aperio's tiles hold RGB samples with no marker saying so: decoded as libjpeg's default (YCbCr) they come out in
    the wrong colours; with the prefix's Adobe APP14 (transform 0) as tifffile decodes them."""
    path = wsi_dir / CMU
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        level = JpegLevel(path, page)
        expected = page.decode(level._read(40), 40, jpegtables=page.jpegtables)[0][0]
    assert level.prefix.startswith(b"\xff\xd8\xff\xee\x00\x0eAdobe") and level.prefix[17] == 0  # transform 0: RGB
    stream = level.stream(40)
    bare = stream[:2] + stream[18:]  # the Adobe segment left out
    decode = [decode_jpeg(torch.frombuffer(bytearray(s), dtype=torch.uint8), mode=ImageReadMode.RGB)
              for s in (stream, bare)]
    with_marker, without = (np.asarray(d.permute(1, 2, 0)).astype(int) for d in decode)
    assert np.abs(with_marker - expected).max() <= DECODER_TOLERANCE
    assert np.abs(without - expected).mean() > 20


@pytest.fixture(scope="module")
def written_pyramids(wsi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-level pyramidal TIFFs (SubIFDs, 240-px JPEG tiles) of the real slide's pixels: stored RGB (photometric 2,
    no JFIF) and YCbCr (photometric 6, subsampled 2 x 2)."""
    with open_slide(wsi_dir / CMU, "tifffile") as slide:
        image = slide.read_region((100, 500), 0, (1500, 1700))
    small = np.asarray(Image.fromarray(image).resize((750, 850), Image.Resampling.BOX))
    folder, paths = tmp_path_factory.mktemp("jpeg-pyramids"), {}
    for name, args in (("rgb", {"photometric": "rgb", "compressionargs": {"outcolorspace": "RGB"}}),
                       ("ycbcr", {"photometric": "rgb"})):  # tifffile stores JPEG as YCbCr by default
        paths[name] = folder / f"{name}.tif"
        with tifffile.TiffWriter(paths[name]) as tif:
            tif.write(image, subifds=1, tile=(240, 240), compression="jpeg", resolution=(2e4, 2e4),
                      resolutionunit="CENTIMETER", **args)
            tif.write(small, subfiletype=1, tile=(240, 240), compression="jpeg", **args)
        with tifffile.TiffFile(paths[name]) as tif:
            assert tif.pages[0].photometric == (2 if name == "rgb" else 6)
    return paths


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
@pytest.mark.parametrize("level", [0, 1])
def test_stored_jpeg_tiles_of_a_written_pyramid_equal_the_readers(written_pyramids: dict[str, Path], photometric: str,
                                                                  level: int) -> None:
    path = written_pyramids[photometric]
    with open_slide(path, "tifffile") as slide:
        geometry = TileGeometry.of(slide, 224, level=level, mpp=None, stride=200)
        lv = slide.levels[level]
        origins = (grid_origins(lv.width, lv.height, 224, 24, seed=level) * lv.downsample).astype(np.int64)
    got, expected = device_and_reader(path, origins, geometry, "tifffile")
    assert np.abs(got.astype(int) - expected).max() <= DECODER_TOLERANCE


def test_resized_grid_tiles_are_within_a_grey_level_of_the_readers(wsi_dir: Path) -> None:
    """At slide.mpp=1.0 on a 0.5-um scan a 224-px tile is 449 px of level 0, shrunk on the device as the reader
    shrinks it (PIL's BOX); enlarging (mpp finer than the scan) likewise."""
    path = wsi_dir / CMU
    for mpp in (1.0, 0.45):
        with open_slide(path, "tifffile") as slide:
            geometry = TileGeometry.of(slide, 224, mpp=mpp)
            origins = grid_origins(*slide.dimensions, geometry.read_size, 12)
        assert geometry.read_size != geometry.tile_size
        got, expected = device_and_reader(path, origins, geometry, "tifffile")
        assert np.abs(got.astype(int) - expected).max() <= RESIZE_TOLERANCE


def test_box_weights_are_pillows_box_filter() -> None:
    rng = np.random.default_rng(0)
    for src, dst in ((449, 224), (300, 224), (200, 224), (240, 240)):
        tiles = rng.integers(0, 256, (2, src, src, 3), dtype=np.uint8)
        expected = np.stack([np.asarray(Image.fromarray(t).resize((dst, dst), Image.Resampling.BOX)) for t in tiles])
        got = resize_tiles(torch.from_numpy(tiles), dst).numpy()
        assert np.abs(got.astype(int) - expected).max() <= RESIZE_TOLERANCE
    assert torch.allclose(box_weights(448, 224, CPU).sum(1), torch.ones(224))


def test_where_the_tiles_are_not_jpeg_the_cpu_reads_them(wsi_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """JPEG 2000 (TCGA), strips (a plain TIFF): the CPU reader, said once per slide; auto on a CPU: the CPU reader,
    the file not even opened for it; an unknown setting names the key."""
    with open_slide(wsi_dir / TCGA) as slide:
        assert "JPEG 2000" in JpegLevel.find(wsi_dir / TCGA, *slide.dimensions)
        geometry = TileGeometry.of(slide, 224)
    assert "strips" in JpegLevel.find(wsi_dir / "kidney-48-5.tif", 1493, 901)
    origins = np.array([[0, 0]])
    with caplog.at_level(logging.INFO, "histoflow.slides.jpeg_tiles"):
        for _ in range(2):
            assert SlideTiles(wsi_dir / TCGA, origins, geometry, 4, decode="device", device=CPU).jpeg is None
    said = [r.getMessage() for r in caplog.records if "read on the CPU" in r.getMessage()]
    assert len(said) == 1 and "JPEG 2000" in said[0]
    assert SlideTiles(wsi_dir / CMU, origins, geometry, 4, decode="auto", device=CPU).jpeg is None
    with pytest.raises(ConfigError, match="slide.decode='gpu'"):
        SlideTiles(wsi_dir / CMU, origins, geometry, 4, decode="gpu", device=CPU)


def test_a_stored_tile_that_does_not_decode_is_named_as_by_the_reader(written_pyramids: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    path = tmp_path / "damaged.tif"
    path.write_bytes(written_pyramids["ycbcr"].read_bytes())
    zero_stored_tile(path, 1, 1)
    with open_slide(path, "tifffile") as slide:
        geometry = TileGeometry.of(slide, 224, mpp=None)
    origins = np.array([[0, 0], [300, 300], [900, 900]])  # the second over stored tile (1, 1)
    results = []
    for decode in ("device", "cpu"):
        tiles = SlideTiles(path, origins, geometry, 8, backend="tifffile", decode=decode, device=CPU)
        [(_, batch, damaged)] = list(tile_loader(tiles, 0))
        results.append((np.asarray(batch), damaged))
    (got, damaged), (expected, expected_damaged) = results
    assert damaged == expected_damaged and set(damaged) == {1}
    assert np.array_equal(got, expected)


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * 20  # spread probabilities: a wrong tile shows


def test_predictions_with_device_decode_equal_the_cpu_readers(wsi_dir: Path, tmp_path: Path) -> None:
    transform = PatchTransform(None, {"mean_image": np.full((32, 32, 3), 128.0)}, normalize="image")
    models, classes = [(TinyNet(), transform)], ["a", "b", "c"]
    rows = {}
    for decode in ("device", "cpu"):
        cfg = SlideConfig(mpp=2.0, batch_size=32, num_workers=1, device="cpu", progress=False, decode=decode)
        result = predict_slide(wsi_dir / CMU, models, classes, cfg, tmp_path / decode)
        with result.csv.open(newline="") as f:
            rows[decode] = {(r["x"], r["y"]): [float(r[f"prob_{c}"]) for c in classes] for r in csv.DictReader(f)}
    assert rows["device"].keys() == rows["cpu"].keys() and len(rows["cpu"]) > 100
    got, expected = (np.array([rows[d][k] for k in sorted(rows["cpu"])]) for d in ("device", "cpu"))
    assert np.abs(got - expected).max() < 1e-5
    assert expected.std(0).max() > 0.01  # the tiles differ in their predictions
