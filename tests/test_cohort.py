"""Cohorts of slides embedded once (features/cohort.py and the modules it launches), on a cohort of generated tissue
and, where ../shared/data is present, on one cut from the real slides (conftest.write_cohort): a shard is the
encoder's forward of the slide's tissue tiles; a killed run resumes to what a clean run writes; a changed slide is
embedded again and an unchanged one is not, also when moved; two Lightning processes, and two chunk jobs of a
submitit sweep, embed each slide exactly once and write the same index as one process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import COHORT_SOURCES, ENCODER_SIDE, REPO, compose_config, write_cohort, write_slide_tiff
from omegaconf import OmegaConf

import histoflow.features.cohort as cohort_module
from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError
from histoflow.features.cohort import embed_cohort
from histoflow.features.cohort_index import balanced_bins, parse_chunk
from histoflow.features.cohort_job import (
    CohortResult,
    CohortRunConfig,
    CohortSlideConfig,
    CohortSlideError,
    cohort_settings,
)
from histoflow.features.slide_features import read_slide_features
from histoflow.models import build_encoder
from histoflow.slides.backend import open_slide
from histoflow.slides.tiles import SlideTiles, TileGeometry, tissue_tiles

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIDE = ENCODER_SIDE  # tiles of 32 px at 1 micron per pixel, into a SqueezeNet at 32 px: ~200 tiles over the cohort


@pytest.fixture(scope="module", params=COHORT_SOURCES)
def cohort(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six slides of 512 px (two a class, one patient each class) and their table: generated, or cut from the real
    slides."""
    return write_cohort(request.param, request, tmp_path_factory.mktemp(f"cohort-{request.param}"), per_label=2)


def overrides(table: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [f"slides={table}", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
            f"encoder.preprocess.input_size={SIDE}", f"slide.tile_size={SIDE}", "slide.mpp=1.0",
            "slide.backend=tifffile", "slide.progress=false", "slide.batch_size=16", "slide.num_workers=1",
            f"embed.out={out}", "on_bad_image=skip", *extra]


def arguments(table: Path, out: Path, weights: Path, *extra: str) -> tuple:
    """embed_cohort's arguments from `histoflow embed` with these overrides."""
    cfg = compose_config("embed", overrides(table, out, weights, *extra))
    return cfg.slides, to_builtin(cfg.encoder), to_builtin(cfg.slide), to_builtin(cfg.embed), cfg.on_bad_image


def embed(table: Path, out: Path, weights: Path, *extra: str) -> CohortResult:
    """`histoflow embed` with these overrides, in this process."""
    return embed_cohort(*arguments(table, out, weights, *extra))


def index_rows(index: Path, without: tuple[str, ...] = ("seconds",)) -> list[dict[str, str]]:
    """The index's rows, less the per-slide seconds (a time, different in every run)."""
    with index.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in without} for row in csv.DictReader(handle)]


def shards(folder: Path) -> dict[str, dict]:
    return {p.name: read_slide_features(p) for p in sorted((folder / "shards").glob("*.npz"))}


def table_rows(table: Path) -> list[dict[str, str]]:
    with table.open(newline="") as handle:
        return list(csv.DictReader(handle))


def table_slides(table: Path) -> list[str]:
    return [row["slide"] for row in table_rows(table)]


@pytest.fixture(scope="module")
def clean(cohort: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> CohortResult:
    """One clean run of the cohort, in one process."""
    return embed(cohort, tmp_path_factory.mktemp("clean"), weights)


def test_a_slides_shard_is_the_encoders_forward_of_its_tissue_tiles(cohort: Path, weights: Path,
                                                                   clean: CohortResult) -> None:
    assert clean.index is not None and sorted(clean.embedded) == sorted(table_slides(cohort))
    rows = index_rows(clean.index, without=())
    assert [r["slide"] for r in rows] == table_slides(cohort)  # the table's order
    columns = ("slide", "patient", "label", "source")  # the table's own columns (source its extra) go on into the index
    assert [[r[c] for c in columns] for r in rows] == [[r[c] for c in columns] for r in table_rows(cohort)]
    assert (clean.folder / "cohort.problems.csv").read_text().strip() == "path,kind,detail,action"
    encoder = build_encoder({"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1",
                             "weights": str(weights)}, SIDE)[0]
    for row in rows:  # real: a kidney slide is a fragment of tissue on glass
        shard = read_slide_features(clean.folder / row["shard"])
        path = cohort.parent / row["slide"]
        with open_slide(path, "tifffile") as slide:
            geometry = TileGeometry.of(slide, SIDE, mpp=1.0)
            origins = tissue_tiles(slide, geometry, 0.5, None, slide.thumbnail(1024))
            mpp = slide.mpp
        np.testing.assert_array_equal(shard["coords_px"], origins)
        np.testing.assert_allclose(shard["coords_um"], origins * mpp)
        tiles = torch.from_numpy(SlideTiles(path, origins, geometry, 64).read(origins)).permute(0, 3, 1, 2)
        x = (tiles.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        with torch.inference_mode():
            expected = encoder(x).numpy()
        assert shard["features"].shape == (len(origins), 512) == (int(row["tiles"]), 512)
        np.testing.assert_allclose(shard["features"], expected, rtol=1e-4, atol=1e-5)
        assert shard["meta"]["sha256"] == row["sha256"] and shard["meta"]["mpp"] == mpp
        assert shard["meta"]["tile_um"] == pytest.approx(SIDE * 1.0, rel=0.01)  # micron-true tiles


def test_a_killed_run_resumes_to_what_a_clean_run_writes(cohort: Path, weights: Path, clean: CohortResult,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "features"
    folder = out / clean.folder.name
    command = [sys.executable, "-m", "histoflow", "embed", *overrides(cohort, out, weights),
               f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((folder / "shards").glob("*.npz")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(run.pid, signal.SIGKILL)  # as soon as the first slide's shard is there
    finally:
        run.wait()
    written = sorted(p.name for p in (folder / "shards").glob("*.npz"))
    total = len(table_slides(cohort))
    assert run.returncode == -signal.SIGKILL and 1 <= len(written) < total, "killed mid-cohort"
    assert not (folder / "cohort.index.csv").exists()

    resumed = embed(cohort, out, weights)
    assert len(resumed.reused) == len(written) and len(resumed.embedded) == total - len(written)
    assert not list((folder / "shards").glob(".*"))  # no half-written shard left
    assert index_rows(resumed.index) == index_rows(clean.index)
    mine, theirs = shards(folder), shards(clean.folder)
    assert mine.keys() == theirs.keys()
    for name, shard in mine.items():
        np.testing.assert_array_equal(shard["coords_px"], theirs[name]["coords_px"])
        np.testing.assert_allclose(shard["features"], theirs[name]["features"], rtol=1e-5, atol=1e-6)
    again = embed(cohort, out, weights)  # nothing left to do
    assert again.embedded == [] and len(again.reused) == total


def test_a_changed_slide_is_embedded_again_an_unchanged_one_not_even_moved(cohort: Path, weights: Path,
                                                                           clean: CohortResult,
                                                                           tmp_path: Path) -> None:
    work = tmp_path / "cohort"
    shutil.copytree(cohort.parent, work)
    out = tmp_path / "features"
    shutil.copytree(clean.folder, out / clean.folder.name)  # what the clean run wrote
    slides = table_slides(cohort)
    changed, moved = work / slides[2], work / slides[1]
    with open_slide(changed, "tifffile") as slide:
        image, mpp = slide.read_region((0, 0), 0, slide.dimensions), slide.mpp
    write_slide_tiff(changed, np.ascontiguousarray(image[::-1]), mpp)  # the same slide upside down
    (work / "archive").mkdir()
    moved.rename(work / "archive" / moved.name)
    table = work / "cohort.csv"
    archived = f"archive/{moved.name}"
    table.write_text(table.read_text().replace(slides[1], archived))

    # another table (another path, other bytes) than the one the copied index was written from: a name of its own
    result = embed(table, out, weights, "embed.name=edited")
    assert result.embedded == [slides[2]]
    assert sorted(result.reused) == sorted(set(table_slides(table)) - {slides[2]})
    before = {r["slide"]: r for r in index_rows(clean.index)}
    after = {r["slide"]: r for r in index_rows(result.index)}
    assert after[archived]["shard"] == before[slides[1]]["shard"]
    assert after[slides[2]]["shard"] != before[slides[2]]["shard"]
    assert after[slides[2]]["tiles"] == before[slides[2]]["tiles"]  # the same tissue, turned


def test_two_lightning_processes_embed_each_slide_exactly_once(cohort: Path, weights: Path, clean: CohortResult,
                                                               tmp_path: Path) -> None:
    result = embed(cohort, tmp_path, weights, "embed.devices=2", "embed.accelerator=cpu", "embed.strategy=ddp_fork")
    assert result.rank == 0 and result.index is not None
    part = json.loads(next((result.folder / "parts" / "cohort").glob("*-chunk-0001-of-0001.json")).read_text())
    by_rank = {e["slide"]: e["rank"] for e in part["embedded"]}
    assert len(part["embedded"]) == len(by_rank) == len(table_slides(cohort))  # each slide once
    assert set(by_rank.values()) == {0, 1}  # shared out over both
    assert index_rows(result.index) == index_rows(clean.index)


def test_two_jobs_on_one_folder_embed_each_slide_once(cohort: Path, weights: Path, clean: CohortResult,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs started together on the same table and folder (threads here: the locks are file locks, held per
    open file, so they part threads as they part processes): each slide embedded by one of them, once. Both have
    written their ranks' parts of the same chunk before either combines them (once the second overwrote the first's
    part, and the first removed it from under the second)."""
    args, start = arguments(cohort, tmp_path, weights), threading.Barrier(2)
    results: list[CohortResult] = []
    both_written, combine = threading.Barrier(2, timeout=120), cohort_module.combine_ranks

    def combine_when_both_have_written(*arguments: object) -> dict:
        both_written.wait()
        return combine(*arguments)

    monkeypatch.setattr(cohort_module, "combine_ranks", combine_when_both_have_written)

    def job() -> None:
        start.wait()
        results.append(embed_cohort(*args))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2
    slides = sorted(table_slides(cohort))
    assert sorted(results[0].embedded + results[1].embedded) == slides  # each once, by one job or the other
    assert all(sorted(r.embedded + r.reused) == slides for r in results)
    assert index_rows(results[0].folder / "cohort.index.csv") == index_rows(clean.index)


def test_a_submitit_sweep_over_two_chunks_writes_the_index_of_one_job(cohort: Path, weights: Path,
                                                                      clean: CohortResult, tmp_path: Path) -> None:
    out = tmp_path / "features"
    command = [sys.executable, "-m", "histoflow", "embed", "-m", *overrides(cohort, out, weights),
               "embed.chunk=1/2,2/2", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = out / clean.folder.name
    parts = sorted((folder / "parts" / "cohort").glob("*-chunk-*-of-0002.json"))
    embedded = [[e["slide"] for e in json.loads(p.read_text())["embedded"]] for p in parts]
    assert len(parts) == 2 and all(embedded) and sorted(sum(embedded, [])) == sorted(table_slides(cohort))
    assert index_rows(folder / "cohort.index.csv") == index_rows(clean.index)


def test_bad_slides_are_listed_with_their_reason_or_stop_the_run(cohort: Path, weights: Path,
                                                                 tmp_path: Path) -> None:
    good = cohort.parent / table_slides(cohort)[3]
    bad = tmp_path / "slides"
    bad.mkdir()
    shutil.copy(good, bad / "good.tif")
    write_slide_tiff(bad / "no-mpp.tif", tifffile.imread(good), None)
    write_slide_tiff(bad / "glass.tif", np.full((512, 512, 3), 240, np.uint8), 0.5)
    (bad / "broken.tif").write_bytes(b"II*\x00" + os.urandom(2000))
    table = tmp_path / "bad.csv"
    table.write_text("slide,patient,label\nslides/good.tif,P1,a\nslides/no-mpp.tif,P1,a\nslides/glass.tif,P2,b\n"
                     "slides/broken.tif,P3,b\n")
    result = embed(table, tmp_path / "features", weights)
    assert result.embedded == ["slides/good.tif"]
    with (result.folder / "bad.problems.csv").open(newline="") as handle:
        problems = {row["path"]: row for row in csv.DictReader(handle)}
    assert {path: row["kind"] for path, row in problems.items()} == {
        "slides/no-mpp.tif": "no-mpp", "slides/glass.tif": "no-tissue", "slides/broken.tif": "unreadable"}
    assert "slide.source_mpp" in problems["slides/no-mpp.tif"]["detail"]
    assert [r["slide"] for r in index_rows(result.index)] == ["slides/good.tif"]

    with pytest.raises(CohortSlideError, match="no-mpp.tif: .*slide.source_mpp.*on_bad_image=skip"):
        embed(table, tmp_path / "stopped", weights, "on_bad_image=error")
    assert len(list((tmp_path / "stopped").glob("*/shards/*.npz"))) == 1  # the slide before it is kept, whole


def test_slides_are_shared_out_by_size_the_same_way_everywhere() -> None:
    bins = balanced_bins([5, 1, 1, 1, 1, 1, 4, 2], 3)
    assert sorted(sum(bins, [])) == list(range(8)) and bins == balanced_bins([5, 1, 1, 1, 1, 1, 4, 2], 3)
    assert [sum([5, 1, 1, 1, 1, 1, 4, 2][i] for i in b) for b in bins] == [6, 5, 5]
    assert balanced_bins([1.0], 2) == [[0], []]  # more processes than slides: one waits at the barrier
    assert parse_chunk("3/16") == (3, 16) and parse_chunk(None) == (1, 1)
    for wrong in ("0/4", "5/4", "3", "a/b"):
        with pytest.raises(ConfigError, match="embed.chunk"):
            parse_chunk(wrong)


def test_the_slurm_launcher_takes_embeds_devices_and_nodes() -> None:
    """hydra/launcher=slurm read trainer.* only, which embed.yaml has not: the cohort's jobs took embed.*."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config("embed", ["hydra/launcher=slurm", "embed.devices=4", "embed.num_nodes=2"],
                         return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["tasks_per_node"] == 4 and launcher["nodes"] == 2


def test_embed_yaml_shows_the_cohort_sections_at_their_defaults() -> None:
    """embed's slide section: the tiling of conf/slide/default.yaml and embed's own keys, each at its dataclass
    default; the embed section at CohortRunConfig's."""
    composed = OmegaConf.to_container(compose_config("embed", []).slide, resolve=True)
    assert composed == asdict(CohortSlideConfig())
    shown = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "embed.yaml").embed)
    assert shown.pop("out") == "${paths.data_dir}/slide_features"  # the dataclass: data/slide_features
    assert shown == {k: v for k, v in asdict(CohortRunConfig()).items() if k != "out"}


# an encoder config written out (not conf/encoder's, which may change): the folder key it names with the default
# tiling was computed by the code before the tiling became one config (slides/tiling.py); a folder of features
# embedded then must be found now
PINNED_ENCODER = {"_target_": "histoflow.models.torchvision_model", "name": "mobilenet_v2", "weights": "imagenet",
                  "preprocess": {"input_size": 224, "interpolation": "bilinear", "mean": MEAN, "std": STD}}


def test_the_default_tiling_keys_the_same_features_folder_as_before(tmp_path: Path) -> None:
    settings, folder = cohort_settings(PINNED_ENCODER, CohortSlideConfig(), tmp_path)
    assert settings["slide"] == {"source_mpp": None, "tile_size": 224, "level": None, "mpp": 0.5, "stride": None,
                                 "min_tissue": 0.5, "tissue_threshold": None, "thumbnail_size": 1024}
    assert sorted(settings) == ["encoder", "format", "input", "kind", "slide", "weights_sha256"]
    assert folder.name == "mobilenet_v2-14f95202d604"
    # tile_size null is read as 224 px: the same tiles, so the same folder as tile_size=224 written out
    assert cohort_settings(PINNED_ENCODER, CohortSlideConfig(tile_size=224), tmp_path)[1] == folder
    assert cohort_settings(PINNED_ENCODER, CohortSlideConfig(tile_size=256), tmp_path)[1] != folder
