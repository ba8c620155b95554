"""A slide- or patient-bag multirun put to work on new slides (`histoflow predict ckpt_path=<multirun> slides=...`,
deployment/cohort_predict.py), on the generated-tissue cohort of conftest: a held-out patient gets from its
fold model the probability the k-fold run recorded, from the very features training made; settings that would change
what the model sees are refused before any work; no labels, no report; the GeoJSON's squares are the tile grid; a
deployment killed mid-cohort resumes to what a clean one writes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_train
from test_slide_bags import overrides, table_rows

from histoflow.deployment.deploy import predict
from histoflow.features.slide_features import read_slide_features
from histoflow.inference.sweep_report import predict_config
from histoflow.models import build_encoder
from histoflow.training.checkpoints import CheckpointError
from histoflow.training.run import train


@pytest.fixture(scope="module")
def slide_cohort(synthetic_slide_cohort: Path) -> Path:
    """The generated-tissue cohort of conftest: runs on a bare clone."""
    return synthetic_slide_cohort


@pytest.fixture(scope="module")
def sweep(slide_cohort: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory,
          leave_no_trace_module: None) -> Path:
    """Three folds of ABMIL on patient bags, two epochs each."""
    root = tmp_path_factory.mktemp("deploy")
    for job, fold in enumerate((1, 2, 3)):
        cfg = compose_train([*overrides(slide_cohort, weights, root / "work", "model.hidden=16", "bag.level=patient",
                                        "data.split.k=3", "trainer.max_epochs=2", f"fold={fold}")],
                            root / "multirun" / str(job), multirun=True)
        train(cfg)
    return root / "multirun"


def new_table(cohort: Path, patients: set[str], path: Path, labels: bool = True) -> Path:
    rows = [r for r in table_rows(cohort) if r["patient"] in patients]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "patient", *(["label"] if labels else [])])
        for r in rows:
            writer.writerow([str((cohort.parent / r["slide"]).resolve()), r["patient"],
                             *([r["label"]] if labels else [])])
    return path


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def config(ckpt: Path, slides: Path, out: Path, *extra: str):
    return predict_config([f"ckpt_path={ckpt}", f"slides={slides}", "on_bad_image=skip", "slide.progress=false",
                           "slide.num_workers=1", "progress=false", *extra], out)


def test_a_held_out_patient_gets_the_probability_its_fold_recorded(sweep: Path, slide_cohort: Path,
                                                                   tmp_path: Path) -> None:
    recorded = {r["image"]: r for r in read(sweep / "0" / "bag_predictions.csv")}
    table = new_table(slide_cohort, set(recorded), tmp_path / "new.csv")
    shards = {p.name for p in (sweep.parent / "work").rglob("shards/*.npz")}
    out = tmp_path / "out"
    predict(config(sweep / "0", table, out, "slide.export=[geojson]"))
    assert {p.name for p in (sweep.parent / "work").rglob("shards/*.npz")} == shards  # training's features, reused
    patients = {r["patient"]: r for r in read(out / "patients.csv")}
    assert set(patients) == set(recorded)
    classes = json.loads((sweep / "0" / "bags.json").read_text())["classes"]
    for name, row in recorded.items():
        for c in classes:
            assert float(patients[name][f"prob_{c}"]) == pytest.approx(float(row[f"prob_{c}"]), abs=2e-6)
        assert patients[name]["predicted"] == row["predicted"]
    report = json.loads((out / "report.json").read_text())  # labelled: the external report, by patient
    assert report["images"] == len(recorded) and report["fold_agreement"]["share"] == 1.0  # one fold model
    assert "ece" in report["calibration"] and (out / "reliability_images.png").is_file()
    assert "## External validation" in (out / "report.md").read_text()
    maps = sorted(p.name for p in (out / "attention_maps").glob("*.heatmap.png"))
    assert maps and (out / "attention_gallery.png").is_file()

    # the GeoJSON's squares are the tile grid of the slide's features
    for meta_path in (out / "slides").glob("*.json"):
        meta = json.loads(meta_path.read_text())
        geo = json.loads(meta_path.with_suffix(".geojson").read_text())
        shard = next(r for r in read(out / "slides.csv") if r["slide"] == meta["slide"])
        index = next((sweep.parent / "work").rglob("shards/*.npz")).parent.parent
        features = read_slide_features(index / "shards" / f"{_sha(index, shard['slide'])}.npz")
        side = round(meta["geometry"]["read_size"] * meta["geometry"]["downsample"])
        expected = {(int(x), int(y)) for x, y in features["coords_px"]}
        corners = {tuple(f["geometry"]["coordinates"][0][0]) for f in geo["features"]}
        assert corners == expected
        for f in geo["features"]:
            (x, y), far = f["geometry"]["coordinates"][0][0], f["geometry"]["coordinates"][0][2]
            assert far == [x + side, y + side]
            assert {"attention", *(f"prob_{c}" for c in classes)} <= set(f["properties"]["measurements"])


def _sha(folder: Path, slide: str) -> str:
    for index in folder.glob("*.index.csv"):
        for r in read(index):
            if r["slide"] == slide:
                return r["sha256"]
    raise AssertionError(f"{slide} in no index of {folder}")


def test_without_labels_predictions_only_and_every_fold_model_averaged(sweep: Path, slide_cohort: Path,
                                                                      tmp_path: Path) -> None:
    patients = {r["patient"] for r in table_rows(slide_cohort)}
    table = new_table(slide_cohort, patients, tmp_path / "new.csv", labels=False)
    out = tmp_path / "out"
    predict(config(sweep, table, out))
    assert not (out / "report.md").exists() and not (out / "report.json").exists()
    rows = read(out / "patients.csv")
    first, last = sorted({r["label"] for r in table_rows(slide_cohort)})[::2][:2]
    assert "label" not in rows[0] and {f"prob_sd_{last}", "models_agree", f"prob_{last}_fold3"} <= set(rows[0])
    for r in rows:
        per_fold = [float(r[f"prob_{first}_fold{k}"]) for k in (1, 2, 3)]
        assert float(r[f"prob_{first}"]) == pytest.approx(np.mean(per_fold), abs=2e-6)
        assert float(r[f"prob_sd_{first}"]) == pytest.approx(np.std(per_fold), abs=2e-6)
    assert {r["patient"] for r in read(out / "slides.csv")} == {r["patient"] for r in rows}


@pytest.mark.parametrize("extra, said", [
    (["slide.mpp=0.25"], "slide.mpp=0.25 (trained: 1.0)"),
    (["slide.tile_size=64"], "slide.tile_size=64 (trained: 32)"),
    (["+encoder.name=mobilenet_v2"], "encoder.name=mobilenet_v2 (trained: squeezenet1_1)"),
])
def test_a_setting_that_changes_what_the_model_sees_is_refused_before_any_work(
        sweep: Path, slide_cohort: Path, tmp_path: Path, extra: list[str], said: str) -> None:
    table = new_table(slide_cohort, {r["patient"] for r in table_rows(slide_cohort)}, tmp_path / "new.csv")
    with pytest.raises(CheckpointError, match=said.replace("(", r"\(").replace(")", r"\)")):
        predict(config(sweep, table, tmp_path / "out", f"features.out={tmp_path / 'features'}", *extra))
    assert not (tmp_path / "features").exists() and not (tmp_path / "out" / "cohort.csv").exists()


def test_other_weights_than_trained_are_refused_naming_both_sha256(sweep: Path, slide_cohort: Path,
                                                                   tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(build_encoder({"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1",
                              "weights": None}, 32)[0].state_dict(), other)
    table = new_table(slide_cohort, {r["patient"] for r in table_rows(slide_cohort)}, tmp_path / "new.csv")
    with pytest.raises(CheckpointError, match=r"weights_sha256: [0-9a-f]{64} \(trained: [0-9a-f]{64}\)"):
        predict(config(sweep, table, tmp_path / "out", f"encoder.weights={other}"))
    assert not list(tmp_path.rglob("*.npz"))


def _run(sweep: Path, table: Path, out: Path, features: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "histoflow", "predict", f"ckpt_path={sweep}", f"slides={table}",
               "on_bad_image=skip", "progress=false", "slide.progress=false", "slide.num_workers=1",
               f"features.out={features}", "slide.export=[geojson]", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_deployment_killed_mid_cohort_resumes_to_what_a_clean_one_writes(sweep: Path, slide_cohort: Path,
                                                                           tmp_path: Path) -> None:
    table = new_table(slide_cohort, {r["patient"] for r in table_rows(slide_cohort)}, tmp_path / "new.csv")
    clean = _run(sweep, table, tmp_path / "clean", tmp_path / "clean-features")
    assert clean.wait(timeout=600) == 0, clean.stderr.read()[-3000:]
    features = tmp_path / "features"
    run = _run(sweep, table, tmp_path / "killed", features)
    try:
        deadline = time.monotonic() + 300
        while not list(features.rglob("shards/*.npz")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(run.pid, signal.SIGKILL)  # as soon as the first slide's features are there
    finally:
        run.wait()
    assert run.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "slides.csv").exists()
    again = _run(sweep, table, tmp_path / "killed", features)
    assert again.wait(timeout=600) == 0, again.stderr.read()[-3000:]
    for name in ("slides.csv", "patients.csv"):
        mine, theirs = read(tmp_path / "killed" / name), read(tmp_path / "clean" / name)
        assert [list(r) for r in mine] == [list(r) for r in theirs]
        for a, b in zip(mine, theirs):
            for k in a:
                if k.startswith("prob_"):
                    assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-5)
                else:
                    assert a[k] == b[k]
    geo = sorted(p.name for p in (tmp_path / "clean" / "slides").glob("*.geojson"))
    assert geo and geo == sorted(p.name for p in (tmp_path / "killed" / "slides").glob("*.geojson"))
    for name in geo:
        a, b = (json.loads((tmp_path / d / "slides" / name).read_text()) for d in ("killed", "clean"))
        assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]]
