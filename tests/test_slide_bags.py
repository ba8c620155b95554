"""Slide and patient bags from a slide table (data=slides, features/slide_bags.py), on the real-tissue cohort cut
from ../shared/data/wsi (testing/cohort_fixture): folds by patient, a five-fold multirun of ABMIL on patient bags
writing the patient-level report, an attention map over every held-out slide and the gallery."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from PIL import Image

from histoflow.common.errors import ConfigError
from histoflow.features.embeddings import Embedder
from histoflow.features.slide_bags import SlideBagDataModule
from histoflow.features.slide_features import read_slide_features
from histoflow.inference.attention_maps import attention_gallery
from histoflow.inference.sweep_report import headline, write_image_report
from histoflow.models import build_encoder
from histoflow.training.run import train

SIDE = 32  # tiles of 32 px at 1 micron per pixel into a SqueezeNet at 32 px


@pytest.fixture(scope="module")
def cohort(slide_cohort: Path) -> Path:
    return slide_cohort


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "squeezenet-random.pth"
    net = build_encoder({"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1", "weights": None},
                        SIDE)[0]
    torch.save(net.state_dict(), path)
    return path


def overrides(table: Path, weights: Path, work: Path, *extra: str) -> list[str]:
    return ["data=slides", f"data.table={table}", f"paths.data_dir={work}", "encoder=squeezenet1_1_imagenet",
            f"encoder.weights={weights}", f"encoder.preprocess.input_size={SIDE}", f"data.slide.tile_size={SIDE}",
            "data.slide.mpp=1.0", "data.slide.backend=tifffile", "data.slide.progress=false",
            "data.slide.num_workers=1", "model=abmil", "bag.batch_size=4", "optimizer=adamw",
            "optimizer.lr=0.005", "trainer.max_epochs=4", "callbacks.model_checkpoint.monitor=null", "logger=csv",
            *extra]


def table_rows(table: Path) -> list[dict[str, str]]:
    with table.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_five_fold_multirun_on_patient_bags_writes_the_patient_report_maps_and_gallery(
        cohort: Path, weights: Path, tmp_path: Path, leave_no_trace: None) -> None:
    sweep = tmp_path / "multirun"
    held_out: dict[str, str] = {}
    for job, fold in enumerate(range(1, 6)):
        cfg = compose_train([*overrides(cohort, weights, tmp_path / "work"), "model.hidden=32", "bag.level=patient",
                             f"fold={fold}"],
                            sweep / str(job), multirun=True)
        metrics = train(cfg)
        assert 0 <= metrics["test/acc_micro"] <= 1
        with (sweep / str(job) / "bag_predictions.csv").open(newline="") as handle:
            for row in csv.DictReader(handle):
                assert row["image"] not in held_out  # every patient is held out by one fold only
                held_out[row["image"]] = str(fold)
    patients = {r["patient"] for r in table_rows(cohort)}
    assert set(held_out) <= patients and len(held_out) >= 7 and len(set(held_out.values())) == 5
    with (sweep / "0" / "problems.csv").open(newline="") as handle:  # slides without tissue: listed, left out
        left_out = {row["path"]: row["kind"] for row in csv.DictReader(handle)}
    assert set(left_out.values()) <= {"no-tissue"}

    write_image_report(sweep)
    out = sweep / "image_report"
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["bag_level"] == "patient" and report["images"] == len(held_out)
    assert report["groups"]["n"] == len(held_out) and len(report["per_fold"]) == 5
    low, high = report["interval"]["image/acc"]
    assert low <= report["pooled"]["image/acc"] <= high
    assert report["case_level"]["groups"] == len(held_out)
    assert "patient accuracy" in headline(report) and f"over {len(held_out)} patients" in headline(report)
    text = (out / "report.md").read_text()
    assert "# Patient-level prediction report" in text and "| patient balanced accuracy |" in text
    assert "case-level accuracy" not in text  # a patient bag is its case: no second, equal figure

    # an attention map over every held-out slide with tiles, in the slide maps' format; a patient's weights add up
    # to one over its slides
    maps = {p.name.removesuffix(".tiles.csv"): p for p in (out / "attention_maps").glob("*.tiles.csv")}
    slides = {Path(r["slide"]).stem: r for r in table_rows(cohort) if r["patient"] in held_out}
    assert set(maps) <= set(slides) and len(maps) >= len(held_out)
    per_patient: dict[str, float] = {}
    for stem, path in maps.items():
        tiles = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
        grid = np.load(path.with_name(f"{stem}.map.npy"))
        meta = json.loads(path.with_name(f"{stem}.json").read_text())
        assert meta["bag"] == slides[stem]["patient"] and meta["label"] == slides[stem]["label"]
        assert np.isfinite(grid).sum() == len(tiles) and np.nanmax(grid) <= 1 + 1e-6
        assert path.with_name(f"{stem}.heatmap.png").stat().st_size > 0
        per_patient[meta["bag"]] = per_patient.get(meta["bag"], 0.0) + float(tiles["attention"].sum())
    np.testing.assert_allclose(list(per_patient.values()), 1.0, atol=1e-3)
    assert (out / "attention_gallery.png").stat().st_size > 0
    assert not set(maps) & {Path(p).stem for p in left_out}
    # a class without a held-out tile (every slide of it without tissue, say) gets no empty rows in the gallery
    runs = [sweep / str(job) for job in range(5)]
    with_absent = attention_gallery(runs, [*report["classes"], "absent"], tmp_path / "gallery.png")
    assert Image.open(with_absent).size == Image.open(out / "attention_gallery.png").size


def test_slide_bags_are_folded_by_patient_and_hold_each_slides_shard(cohort: Path, weights: Path,
                                                                     tmp_path: Path) -> None:
    cfg = compose_train(overrides(cohort, weights, tmp_path / "work", "bag.level=slide", "data.split.k=3",
                                  "data.split.val_fraction=0.3"), tmp_path / "run")
    data = {k: v for k, v in cfg.data.items() if k != "_target_"}
    module = SlideBagDataModule(fold=2, embed=Embedder(cfg.encoder), bag=cfg.bag, **data)
    module.prepare_data()
    module.setup("fit")
    roles = {role: {b.group for b in bags} for role, bags in module.bags.items()}
    assert roles["train"] and roles["test"]
    assert not (roles["train"] & roles["test"] or roles["train"] & roles["val"] or roles["val"] & roles["test"])
    bag = module.bags["test"][0]
    source = module.tile_sources([bag])[str(int(bag.coords[0, 0]))]
    shard = read_slide_features(source["shard"])
    torch.testing.assert_close(bag.features, torch.from_numpy(shard["features"]))
    np.testing.assert_array_equal(bag.coords[:, 1:3], shard["coords_px"])
    assert Path(source["path"]).name == Path(bag.name).name
    with pytest.raises(ConfigError, match="model must be a head on bags"):
        train(compose_train(overrides(cohort, weights, tmp_path / "work", "model=linear_head"), tmp_path / "r2"))
