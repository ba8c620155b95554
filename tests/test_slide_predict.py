"""Whole-slide prediction on the real slides of ../shared/data/wsi with a tiny model trained here; slide tiles
written to shards; memory bounded on a 40,000 x 40,000 synthetic slide."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import compose_config, compose_train
from omegaconf import OmegaConf
from PIL import Image
from test_slide import write_jpeg_slide, zero_stored_tile

from histoflow.data.shards import decode_npy, parse_key, tar_samples
from histoflow.deployment import slide_predict
from histoflow.deployment.slide_map import (
    SlideConfig,
    default_heatmap_class,
    predict_slide,
)
from histoflow.inference.fold_models import FoldModel, load_fold_model
from histoflow.inference.heatmap import output_names
from histoflow.slides.backend import open_slide
from histoflow.slides.slide import (
    DamagedTile,
    DamagedTileError,
    SlideError,
    SlideSettingError,
)
from histoflow.slides.tiles import (
    NoTissueError,
    SlideTiles,
    TileGeometry,
    tissue_tiles,
    worker_blocks,
)
from histoflow.testing.slide_shards import write_slide_shards
from histoflow.testing.synthetic_slide import write_pyramid
from histoflow.training.run import train

REPO = Path(__file__).resolve().parents[1]
CMU = "cmu-1-small-region.svs"  # JPEG tiles, one level, 2220 x 2967, 0.499 um/px
TCGA = "tcga-cr-7395-01a-01-ts1.svs"  # JPEG 2000 tiles, two levels
MEMORY_BOUND = 2 << 30  # bytes: slide prediction of any slide stays below this


@pytest.fixture(scope="module")
def model(kather_dir: Path, tmp_path_factory: pytest.TempPathFactory, leave_no_trace_module: None) -> FoldModel:
    """The 32-px AlexNet-style net trained one batch on the Kather sample (8 classes), loaded from its checkpoint."""
    work = tmp_path_factory.mktemp("kather-model")
    overrides = ["data=kather", f"data.root={kather_dir}", f"paths.data_dir={work / 'data'}",
                 f"paths.cache_dir={work / 'cache'}", "model=alexnet32", "data.patches.resize=32",
                 "data.loader.crop=32", "data.loader.num_workers=0", "data.shards.workers=1", "fold=test",
                 "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                 "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "test=false"]
    return load_fold_model(train(compose_train(overrides, work / "run"))["best_checkpoint"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_real_slide_end_to_end(model: FoldModel, wsi_dir: Path, tmp_path: Path) -> None:
    """128-px tiles at level 0, shrunk to the net's 32 px, read by two workers: CSV, map, heatmap and JSON agree."""
    cfg = SlideConfig(tile_size=128, mpp=None, batch_size=16, num_workers=2, progress=False)
    result = predict_slide(wsi_dir / CMU, [(model.net, model.transform)], model.classes, cfg, tmp_path)
    rows = read_csv(result.csv)
    assert len(rows) == result.tiles > 20
    assert list(rows[0]) == ["x", "y", "row", "col", "predicted", *(f"prob_{c}" for c in model.classes)]
    prob_map = np.load(result.map)
    assert prob_map.shape == (2967 // 128, 2220 // 128, 8) and prob_map.dtype == np.float32  # (rows, cols, classes)
    tissue = ~np.isnan(prob_map[..., 0])
    assert tissue.sum() == len(rows) and 0 < tissue.mean() < 1  # NaN where no tissue was predicted
    for row in rows:
        x, y, r, c = (int(row[k]) for k in ("x", "y", "row", "col"))
        assert (x, y) == (c * 128, r * 128)  # level-0 origin of the grid cell
        probs = np.array([float(row[f"prob_{k}"]) for k in model.classes])
        np.testing.assert_allclose(prob_map[r, c], probs, atol=1e-6)
        assert row["predicted"] == model.classes[int(probs.argmax())]
    np.testing.assert_allclose(np.nansum(prob_map, axis=-1)[tissue], 1.0, atol=1e-5)
    # the workers' tiles are the tiles the model would get from reading the slide here, one by one
    with open_slide(wsi_dir / CMU) as slide:
        r0 = rows[len(rows) // 2]
        tile = slide.read_region((int(r0["x"]), int(r0["y"])), 0, (128, 128))
    small = np.array(Image.fromarray(tile).resize((32, 32), Image.Resampling.BOX))
    direct = model.net(model.transform(small[None])).softmax(-1)[0].detach().numpy()
    np.testing.assert_allclose(direct, prob_map[int(r0["row"]), int(r0["col"])], atol=1e-5)
    with Image.open(result.heatmap) as png:
        assert png.format == "PNG" and min(png.size) > 200
    meta = json.loads(result.meta.read_text())
    assert meta["heatmap_class"] == "01_TUMOR" and meta["tiles"] == len(rows) and meta["mpp"] == pytest.approx(0.499)
    assert sum(meta["predicted_tiles"].values()) == len(rows)


def test_predict_at_target_mpp_or_level(model: FoldModel, wsi_dir: Path, tmp_path: Path) -> None:
    """32-px tiles at twice the slide's mpp are read as 64 px and shrunk; the JPEG 2000 slide, whose file gives no
    mpp, is predicted at its level 1 instead, and asking it for an mpp says to pass a level."""
    with open_slide(wsi_dir / CMU) as slide:
        mpp = 2 * slide.mpp
        geometry = TileGeometry.of(slide, 32, mpp=mpp, out_size=32)
        assert (geometry.level, geometry.read_size, geometry.tile_size) == (0, 64, 32)
    cfg = SlideConfig(mpp=mpp, heatmap_class="07_ADIPOSE", batch_size=64, num_workers=0, progress=False)
    result = predict_slide(wsi_dir / CMU, [(model.net, model.transform)], model.classes, cfg, tmp_path)
    meta = json.loads(result.meta.read_text())
    assert meta["geometry"]["read_size"] == 64 and meta["heatmap_class"] == "07_ADIPOSE"
    assert np.load(result.map).shape[:2] == (geometry.rows, geometry.cols) == (2967 // 64, 2220 // 64)

    cfg = SlideConfig(level=1, mpp=None, tile_size=128, batch_size=64, num_workers=1, progress=False)
    result = predict_slide(wsi_dir / TCGA, [(model.net, model.transform)], model.classes, cfg, tmp_path)
    meta = json.loads(result.meta.read_text())
    assert meta["geometry"]["level"] == 1 and meta["geometry"]["downsample"] == pytest.approx(2.0, abs=0.01)
    assert result.tiles > 50 and np.load(result.map).shape == (1783 // 128, 2221 // 128, 8)
    with pytest.raises(SlideError, match="no microns per pixel in the file.*Fix: slide.source_mpp=.*or slide.mpp=null"):
        predict_slide(wsi_dir / TCGA, [(model.net, model.transform)], model.classes, SlideConfig(mpp=0.5), tmp_path)


def test_a_setting_the_slide_cannot_honour_names_the_setting(model: FoldModel, wsi_dir: Path,
                                                             tmp_path: Path) -> None:
    """Issue 29: slide.level=7 and an unreachable slide.mpp ended with "re-copy or re-export these slides", though
    the files are fine: each is a setting error naming the key and a value that works, and so is the run's end."""
    with open_slide(wsi_dir / CMU) as slide:  # one level, 0.499 microns per pixel, 2220 x 2967 px
        with pytest.raises(SlideSettingError, match=r"slide.level=7 does not exist .*Fix: slide.level=0 or lower"):
            TileGeometry.of(slide, 32, level=7)
        with pytest.raises(SlideSettingError, match=r"slide.mpp=0.1 is finer than the slide was scanned \(0.499.*"
                                                    r"Fix: slide.mpp=0.50 or coarser"):
            TileGeometry.of(slide, 32, mpp=0.1)
        with pytest.raises(SlideSettingError, match=r"at slide.mpp=100.0 a tile is 6413 px of level 0, larger than"):
            TileGeometry.of(slide, 32, mpp=100.0)
        assert TileGeometry.of(slide, 32, mpp=0.47).read_size == 30  # a scan a little coarser than asked: read
    stopped = run_predict_on_slides(model, [wsi_dir / CMU], tmp_path / "run", "slide.level=7")
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "slide.level=7 does not exist" in stopped.stderr and "re-copy" not in stopped.stderr
    assert "Fix: change the slide setting each line names" in stopped.stderr
    problems = read_csv(tmp_path / "run" / "problems.csv")
    assert [r["kind"] for r in problems] == ["setting"]


def test_heatmap_class_default() -> None:
    assert default_heatmap_class(["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]) == 8
    assert default_heatmap_class(["01_TUMOR", "02_STROMA"]) == 0
    assert default_heatmap_class(["CLL", "FL", "MCL"]) == 2  # no tumour class: the last
    assert default_heatmap_class(["STUMP", "OTHER"]) == 1  # "TUM" inside a word is not a tumour class
    with pytest.raises(ValueError, match="not a class"):
        default_heatmap_class(["A", "B"], "TUM")


def test_no_tissue_names_the_slide_and_the_fix(model: FoldModel, tmp_path: Path) -> None:
    """A faintly stained section: Otsu's floor finds nothing and says how to fix it; a lower threshold finds it."""
    image = np.full((1024, 1024, 3), 244, np.uint8)
    image[300:700, 200:800] = (232, 224, 230)  # saturation ~0.034, below the 0.05 floor of the automatic threshold
    path = tmp_path / "faint.tif"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    cfg = SlideConfig(tile_size=64, mpp=None, num_workers=0, progress=False)
    with pytest.raises(NoTissueError, match=r"faint\.tif: no tissue found.*Fix: lower the tissue threshold") as caught:
        predict_slide(path, [(model.net, model.transform)], model.classes, cfg, tmp_path / "out")
    # the hint names predict.py's own override keys, with values that would parse
    hinted = dict(re.findall(r"(slide\.\w+)=([\d.]+)", str(caught.value)))
    assert hinted == {"slide.tissue_threshold": "0.02", "slide.min_tissue": "0.1"}
    predict_cfg = compose_config("predict", [])  # with its defaults list: the tiling of conf/slide
    assert all(OmegaConf.select(predict_cfg, key, default="absent") != "absent" for key in hinted)
    assert not (tmp_path / "out" / "faint.tiles.csv").exists()
    cfg.tissue_threshold = 0.02
    result = predict_slide(path, [(model.net, model.transform)], model.classes, cfg, tmp_path / "out")
    centres = [(int(r["x"]) + 32, int(r["y"]) + 32) for r in read_csv(result.csv)]
    assert 50 <= len(centres) <= 70 and all(200 <= x <= 800 and 300 <= y <= 700 for x, y in centres)  # ~6 x 10 tiles


@pytest.mark.parametrize(("name", "level", "size", "stride", "out_size"),
                         [(CMU, 0, 100, 70, 100), (TCGA, 1, 64, 64, 40)],
                         ids=["jpeg-overlap", "jpeg2000-level1-resized"])
def test_tile_batches_equal_single_reads(wsi_dir: Path, name: str, level: int, size: int, stride: int,
                                         out_size: int) -> None:
    """A batch reads runs of neighbouring tiles as one strip; every tile equals its own read_region. Through
    OpenSlide above level 0 it equals it to within half a pixel: OpenSlide places a read at a non-integer downsample
    (2.0005 here) to a fraction of a pixel, a strip's tiles lie on the strip's pixel grid, so each tile must be
    closer to its own read than to that read moved by one pixel of the level."""
    with open_slide(wsi_dir / name) as slide:
        geometry = TileGeometry.of(slide, size, level=level, stride=stride, out_size=out_size)
        origins = tissue_tiles(slide, geometry)[:60]
        batch = SlideTiles(wsi_dir / name, origins, geometry, 60).read(origins)

        def alone(x: int, y: int) -> np.ndarray:
            region = slide.read_region((x, y), level, (size, size))
            if out_size != size:
                region = np.asarray(Image.fromarray(region).resize((out_size, out_size), Image.Resampling.BOX))
            return region.astype(int)

        step = round(slide.levels[level].downsample)
        for (x, y), tile in zip(origins, batch):
            x, y = int(x), int(y)
            if slide.backend == "openslide" and level > 0:
                own = np.abs(tile - alone(x, y)).mean()
                moved = [np.abs(tile - alone(x + dx, y + dy)).mean()
                         for dx, dy in ((step, 0), (-step, 0), (0, step), (0, -step))]
                assert own <= min(moved), (x, y, own, moved)
            else:
                np.testing.assert_array_equal(tile, alone(x, y))


def test_slide_tiles_to_shards(wsi_dir: Path, tmp_path: Path) -> None:
    """Tissue tiles in prepare's sample format: <slide>-<x>-<y>-000 keys, .npy tiles as read, .cls, pixel sums."""
    with open_slide(wsi_dir / CMU) as slide:
        geometry = TileGeometry.of(slide, 96, level=0, out_size=48)
        origins = tissue_tiles(slide, geometry)
        labels = np.arange(len(origins)) % 3  # per-tile labels, as annotations would give
        records = write_slide_shards(wsi_dir / CMU, tmp_path, labels, geometry, origins, slide_index=7,
                                     samples_per_shard=50, num_workers=1)
        sizes = [50] * (len(origins) // 50) + ([len(origins) % 50] if len(origins) % 50 else [])
        assert [r["samples"] for r in records] == sizes
        label_of = {(int(x), int(y)): int(k) for (x, y), k in zip(origins, labels)}
        seen = {}
        total = 0
        for sample in tar_samples([{"url": str(tmp_path / r["file"])} for r in records]):
            key = parse_key(sample["__key__"])
            tile = decode_npy(sample["npy"])
            assert key["image"] == 7 and key["rot"] == 0 and tile.shape == (48, 48, 3) and tile.dtype == np.uint8
            seen[(key["x"], key["y"])] = tile
            assert int(sample["cls"]) == label_of[(key["x"], key["y"])]
            total += tile.astype(np.int64).sum()
        assert set(seen) == set(label_of)  # every tissue tile once
        for (x, y), tile in list(seen.items())[:40]:  # each tile as read alone, 96 px shrunk to 48
            alone = slide.read_region((x, y), 0, (96, 96))
            shrunk = np.asarray(Image.fromarray(alone).resize((48, 48), Image.Resampling.BOX))
            np.testing.assert_array_equal(tile, shrunk)
        sums = [np.load(tmp_path / f"{r['file']}.stats.npz") for r in records]
        assert sum(int(s["count"]) for s in sums) == len(origins)
        assert sum(s["pixel_sum"].sum() for s in sums) == pytest.approx(total)


# --- memory on a slide far larger than memory ------------------------------------------------------


SMALL_SECTIONS = [(0.3, 0.4, 0.15), (0.75, 0.7, 0.12)]  # centre x, y and radius, as fractions of the side


PEAK_SCRIPT = REPO / "benchmarks" / "slide_peak_memory.py"  # the measurement, shared with bench_wsi.py


def peak_memory(slide: Path, out: Path, tile: int, workers: int) -> dict[str, int]:
    """Tiles predicted, and bytes: the predicting process's peak RSS before and after predicting, the largest
    loader worker's peak RSS, and the peak total PSS of the process and its workers (sampled every 20 ms)."""
    result = subprocess.run([sys.executable, str(PEAK_SCRIPT), str(slide), str(out), str(tile), str(workers)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_memory_bounded_on_a_40000_px_slide(tmp_path: Path) -> None:
    """4.8 GB of pixels at level 0, predicted in 1024-px tiles read at level 0 (decoding ~4 JPEG tiles each):
    the predicting process and its two loader workers together stay under 2 GiB (benchmarks/bench_wsi.py shows
    the same peak for a 10,000-px slide)."""
    path = tmp_path / "big.tif"
    write_pyramid(path, 40_000, sections=SMALL_SECTIONS)
    with open_slide(path) as slide:
        assert slide.dimensions == (40_000, 40_000) and len(slide.levels) == 3
    peak = peak_memory(path, tmp_path / "out", tile=1024, workers=2)
    assert peak["tiles"] > 150  # the sections' area: ~0.115 of the 39 x 39 grid
    gib = 2**30
    assert peak["total_pss"] < MEMORY_BOUND, f"{peak['total_pss'] / gib:.2f} GiB in the process and its workers"
    # predicting adds little to what the imports and the model took: the slide's pixels are never all in memory
    grown = peak["self"] - peak["before"]
    assert grown < 0.5 * gib, f"prediction grew the process by {grown / gib:.2f} GiB"
    assert 0 < peak["worker"] < gib
    prob_map = np.load(tmp_path / "out" / "big.map.npy", mmap_mode="r")
    assert prob_map.shape == (39, 39, 8) and np.isnan(prob_map[0, 0, 0]) and not np.isnan(prob_map[16, 12, 0])


def test_predict_command_line_on_slides(model: FoldModel, wsi_dir: Path, tmp_path: Path) -> None:
    """`predict.py slides=...`: every readable slide gets its outputs; a slide without tissue is reported, not fatal."""
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.full((512, 512, 3), 255, np.uint8), tile=(256, 256))
    result = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"ckpt_path={model.path}", f"slides=[{wsi_dir / CMU},{blank}]",
         "slide.tile_size=256", "slide.mpp=null", "slide.num_workers=0", "on_bad_image=skip", "progress=false",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "run" / "slides.csv")
    assert [Path(r["slide"]).name for r in rows] == [CMU] and int(rows[0]["tiles"]) > 0
    for suffix in (".tiles.csv", ".map.npy", ".heatmap.png", ".json"):
        assert (tmp_path / "run" / "slides" / f"{Path(CMU).stem}{suffix}").is_file()
    problems = (tmp_path / "run" / "problems.csv").read_text()
    assert "blank.tif" in problems and "tissue" in problems


@pytest.mark.parametrize(("batches", "workers"), [(0, 2), (1, 2), (7, 2), (10, 3), (5, 0), (3, 4)])
def test_worker_blocks_give_each_worker_a_contiguous_block(batches: int, workers: int) -> None:
    order = worker_blocks(batches, workers)
    assert sorted(order) == list(range(batches))  # every batch exactly once
    w = max(1, workers)
    for j in range(w):
        mine = order[j::w]  # what the DataLoader hands worker j
        assert not mine or mine == list(range(mine[0], mine[0] + len(mine)))


# --- damaged and truncated slides ----------------------------------------------------------------


@pytest.fixture
def damaged_slide(tmp_path: Path) -> Path:
    """write_jpeg_slide's slide with its level-0 stored tile at row 3, column 2 (in the tissue) zeroed."""
    path = tmp_path / "damaged.tif"
    write_jpeg_slide(path)
    zero_stored_tile(path, 3, 2)
    return path


def test_damaged_tile_stops_the_slide_or_is_left_out(model: FoldModel, damaged_slide: Path, tmp_path: Path) -> None:
    """By default a zeroed stored tile stops the slide with an error naming it (no half-written outputs); with
    skip_damaged the four 128-px tiles over it are NaN in the map, absent from the CSV and listed in the JSON."""
    cfg = SlideConfig(tile_size=128, mpp=None, thumbnail_size=512, batch_size=16, num_workers=2, progress=False)
    models = [(model.net, model.transform)]
    with pytest.raises(DamagedTileError, match=r"damaged\.tif: level 0, stored tile row 3 col 2 \(pixel x 512, y 768\)"
                                               r": does not decode \(Jpeg8Error"):
        predict_slide(damaged_slide, models, model.classes, cfg, tmp_path / "stopped")
    assert not list((tmp_path / "stopped").iterdir())

    result = predict_slide(damaged_slide, models, model.classes, cfg, tmp_path / "skipped", skip_damaged=True)
    assert [(t.level, t.row, t.col, t.x, t.y) for t in result.damaged] == [(0, 3, 2, 512, 768)]
    assert result.left_out == 4
    prob_map = np.load(result.map)
    assert np.isnan(prob_map[6:8, 4:6]).all()  # grid rows 6-7, columns 4-5 lie on the damaged stored tile
    rows = read_csv(result.csv)
    cells = {(int(r["row"]), int(r["col"])) for r in rows}
    assert len(rows) == result.tiles == (~np.isnan(prob_map[..., 0])).sum() > 50
    assert not cells & {(6, 4), (6, 5), (7, 4), (7, 5)} and {(5, 4), (8, 5), (6, 3), (7, 6)} <= cells
    meta = json.loads(result.meta.read_text())
    assert meta["tiles"] == len(rows) and meta["damaged"]["left_out"] == [[6, 4], [6, 5], [7, 4], [7, 5]]
    assert DamagedTile(**meta["damaged"]["stored_tiles"][0]) == result.damaged[0]


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_damage_under_the_thumbnail_of_a_one_level_slide_leaves_the_rest_predicted(model: FoldModel, tmp_path: Path,
                                                                                   backend: str) -> None:
    """Issue 25: a one-level slide whose damage lay in what the tissue mask reads (the whole level) was skipped whole
    under on_bad_image=skip, while the message said the rest is predicted. Now the thumbnail leaves the damaged
    stored tile white (no tissue there), the tiles over it are left out, and the rest is predicted."""
    one_level = tmp_path / "one-level.tif"
    write_jpeg_slide(tmp_path / "two-levels.tif")
    with tifffile.TiffFile(tmp_path / "two-levels.tif") as tif:
        image = tif.pages[0].asarray()
    tifffile.imwrite(one_level, image, tile=(256, 256), photometric="rgb", compression="jpeg")
    zero_stored_tile(one_level, 3, 2)
    cfg = SlideConfig(backend=backend, tile_size=128, mpp=None, thumbnail_size=512, batch_size=16, num_workers=0,
                      progress=False)
    models = [(model.net, model.transform)]
    with pytest.raises(DamagedTileError, match=r"level 0, stored tile row 3 col 2 \(pixel x 512, y 768\)"):
        predict_slide(one_level, models, model.classes, cfg, tmp_path / "stopped")
    result = predict_slide(one_level, models, model.classes, cfg, tmp_path / "skipped", skip_damaged=True)
    assert [(t.level, t.row, t.col, t.x, t.y) for t in result.damaged] == [(0, 3, 2, 512, 768)]
    prob_map = np.load(result.map)
    assert np.isnan(prob_map[6:8, 4:6]).all() and result.tiles > 50  # the rest of the tissue is predicted


def run_predict_on_slides(model: FoldModel, slides: list[Path], run: Path,
                          *overrides: str) -> subprocess.CompletedProcess:
    """`predict.py slides=[...]` with 128-px tiles at level 0 and a 512-px thumbnail (a level above the damaged one)."""
    return subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"ckpt_path={model.path}", f"slides=[{','.join(map(str, slides))}]",
         "slide.tile_size=128", "slide.mpp=null", "slide.thumbnail_size=512", "slide.num_workers=1", "progress=false",
         f"hydra.run.dir={run}", *overrides], capture_output=True, text=True, timeout=300)


def test_predict_command_line_goes_on_past_damaged_and_truncated_slides(model: FoldModel, wsi_dir: Path,
                                                                         damaged_slide: Path, tmp_path: Path) -> None:
    """A damaged and a truncated slide before a good one: with skip the damaged tile is listed in problems.csv and
    both readable slides are predicted; by default the run fails naming the slide, level and tile, without a
    traceback, after predicting the good slide; either way slides.csv and problems.csv are written."""
    truncated = tmp_path / "truncated.svs"
    data = (wsi_dir / CMU).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    slides = [damaged_slide, truncated, wsi_dir / CMU]

    skipped = run_predict_on_slides(model, slides, tmp_path / "skip", "on_bad_image=skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    rows = read_csv(tmp_path / "skip" / "slides.csv")
    assert [(Path(r["slide"]).name, r["damaged_tiles"]) for r in rows] == [("damaged.tif", "1"), (CMU, "0")]
    problems = {Path(r["path"]).name: r for r in read_csv(tmp_path / "skip" / "problems.csv")}
    assert set(problems) == {"damaged.tif", "truncated.svs"}
    assert "level 0, stored tile row 3 col 2 (pixel x 512, y 768)" in problems["damaged.tif"]["detail"]
    assert "4 tissue tiles over them are NaN" in problems["damaged.tif"]["detail"]
    assert "the file is truncated" in problems["truncated.svs"]["detail"]
    kinds = {name: r["kind"] for name, r in problems.items()}
    assert kinds == {"damaged.tif": "damaged-tiles", "truncated.svs": "unreadable"}
    assert {r["action"] for r in problems.values()} == {"skipped"}

    stopped = run_predict_on_slides(model, slides, tmp_path / "error")
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert f"{damaged_slide}: level 0, stored tile row 3 col 2 (pixel x 512, y 768)" in stopped.stderr
    assert "on_bad_image=skip" in stopped.stderr and "truncated.svs: the file is truncated" in stopped.stderr
    assert [Path(r["slide"]).name for r in read_csv(tmp_path / "error" / "slides.csv")] == [CMU]
    problems = read_csv(tmp_path / "error" / "problems.csv")
    assert [Path(r["path"]).name for r in problems] == ["damaged.tif", "truncated.svs"]
    assert "stored tile row 3 col 2" in problems[0]["detail"] and problems[0]["action"] == "stopped"


def test_slide_tables_are_written_when_a_run_breaks(model: FoldModel, wsi_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error on the second slide propagates, but slides.csv and problems.csv say what was done."""
    real = slide_predict.predict_slide

    def second_breaks(path: Path, *args, **kwargs):
        if Path(path).name == TCGA:
            raise RuntimeError("out of device memory")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(slide_predict, "predict_slide", second_breaks)
    cfg = OmegaConf.create({"slides": [str(wsi_dir / CMU), str(wsi_dir / TCGA), str(wsi_dir / CMU)],
                            "slide": {"tile_size": 256, "num_workers": 0, "progress": False}, "on_bad_image": "error"})
    with pytest.raises(RuntimeError, match="out of device memory"):
        slide_predict.predict_slides(cfg, [[model]], None, tmp_path, {})
    assert [Path(r["slide"]).name for r in read_csv(tmp_path / "slides.csv")] == [CMU]
    problems = read_csv(tmp_path / "problems.csv")
    assert [(Path(r["path"]).name, r["kind"], r["action"]) for r in problems] == [(TCGA, "run-stopped", "stopped")]
    assert problems[0]["detail"] == "the run stopped at this slide: RuntimeError: out of device memory"


def test_output_names_follow_one_stated_rule() -> None:
    """The first slide of a name keeps it; a later one gets -2, -3, ..., never a name another slide has as its own,
    and names that differ in case only are one name (one file on macOS and Windows). The former rule put the folder
    in front (a/b-s1.tif -> b-s1) and then clashed with a slide of that very name (b/s1.tif -> b-s1-1)."""
    paths = [Path("a/b-s1.tif"), Path("b/s1.tif"), Path("c/s1.tif"), Path("d/S1.tif"), Path("e/s1-2.tif")]
    assert output_names(paths) == {
        Path("a/b-s1.tif"): "b-s1", Path("b/s1.tif"): "s1", Path("c/s1.tif"): "s1-3", Path("d/S1.tif"): "S1-4",
        Path("e/s1-2.tif"): "s1-2"}
    assert output_names(paths[:2]) == {paths[0]: "b-s1", paths[1]: "s1"}  # unique: the stem alone


def test_slides_of_one_file_name_in_two_folders_keep_their_own_outputs(model: FoldModel, wsi_dir: Path,
                                                                       tmp_path: Path) -> None:
    """Outputs are named by the slide's file: a/s1.svs and b/s1.svs once wrote over each other's map and heatmap."""
    assert output_names([Path("a/s1.svs"), Path("b/s1.svs"), Path("c/s2.svs")]) == {
        Path("a/s1.svs"): "s1", Path("b/s1.svs"): "s1-2", Path("c/s2.svs"): "s2"}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / CMU).symlink_to(wsi_dir / CMU)
    run = run_predict_on_slides(model, [tmp_path / "a" / CMU, tmp_path / "b" / CMU], tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_csv(tmp_path / "run" / "slides.csv")
    stem = Path(CMU).stem
    assert [(r["output"], Path(r["map"]).name) for r in rows] == [(stem, f"{stem}.map.npy"),
                                                                  (f"{stem}-2", f"{stem}-2.map.npy")]
    assert all(Path(r["map"]).is_file() and Path(r["heatmap"]).is_file() for r in rows)
