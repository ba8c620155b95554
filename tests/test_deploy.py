"""Putting a trained model to work (issue 36, images): a frozen encoder runs once per window for every fold model
(patch vote and bag heads alike, counted); a bag head's prediction through `histoflow predict` equals what its fold
recorded for the same image; labelled new images get the external report, unlabelled ones predictions only; the
checkpoint's settings cannot be changed from the command line."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import test_embeddings
import torch
from conftest import compose_train, make_images

from histoflow.common.errors import ConfigError
from histoflow.deployment import predict as image_predict
from histoflow.deployment.bag_predict import predict_bags
from histoflow.deployment.deploy import predict
from histoflow.inference import held_out
from histoflow.inference.fold_models import encoder_groups, find_checkpoints, load_fold_model
from histoflow.inference.sweep_report import predict_config
from histoflow.inference.voting import grid_config, predict_images
from histoflow.models import build_encoder
from histoflow.training.checkpoints import CheckpointError
from histoflow.training.run import train

pytestmark = pytest.mark.usefixtures("leave_no_trace")
images = test_embeddings.images  # 4 tinted 72-px images a class
head_sweep = test_embeddings.head_sweep  # two folds of a linear head on frozen SqueezeNet features
CLASSES = ["CLL", "FL", "MCL"]


@pytest.fixture(scope="module")
def bag_sweep(images: Path, tmp_path_factory: pytest.TempPathFactory, leave_no_trace_module: None) -> Path:
    """Two folds of ABMIL on image bags of frozen (random, seeded) SqueezeNet features, as test_mil trains them."""
    tmp = tmp_path_factory.mktemp("bags")
    torch.manual_seed(0)
    weights = tmp / "squeezenet.pth"
    torch.save(build_encoder(test_embeddings.ENCODER, 40)[0].state_dict(), weights)
    overrides = [f"data.root={images}", f"paths.data_dir={tmp / 'work'}", "protocol=images", "data.split.k=2",
                 "data.split.val_fraction=0", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
                 "encoder.preprocess.input_size=40", "model=abmil", "model.hidden=null", "optimizer=adamw",
                 "optimizer.lr=0.01", "trainer.max_epochs=10", "++data.loader.num_workers=0", "bag.batch_size=4",
                 "callbacks.model_checkpoint.monitor=null", "logger=csv"]
    for job, fold in enumerate((1, 2)):
        train(compose_train([*overrides, f"fold={fold}"], tmp / "multirun" / str(job), multirun=True))
    return tmp / "multirun"


def counting(models: list, calls: list[int]) -> list:
    """Each model's encoder counts the windows it embeds into calls[0] (a forward hook)."""
    for m in models:
        m.encoder.register_forward_hook(lambda module, args, out: calls.__setitem__(0, calls[0] + len(args[0])))
    return models


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_frozen_encoder_runs_once_per_window_for_every_fold_model(head_sweep: Path, images: Path) -> None:
    paths = sorted(images.rglob("*.png"))
    results = {}
    for share in (False, True):
        calls = [0]
        models = counting([load_fold_model(p) for p in find_checkpoints(head_sweep)], calls)
        groups = encoder_groups(models, share=share)
        votes = predict_images(paths, groups, 3, grid_config(36, 32), num_workers=0, device="cpu", progress=False)
        results[share] = (calls[0], votes)
    windows = int(results[True][1].patches.sum())
    assert windows == 12 * 4 and results[True][0] == windows and results[False][0] == 2 * windows
    np.testing.assert_allclose(results[True][1].prob_sum, results[False][1].prob_sum, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(results[True][1].model_prob_sum, results[False][1].model_prob_sum, rtol=1e-6, atol=1e-8)
    assert (results[True][1].votes == results[False][1].votes).all()


def test_histoflow_predict_embeds_each_window_once_for_five_fold_models(
        head_sweep: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    loaded = held_out.load_fold_model
    monkeypatch.setattr(held_out, "load_fold_model", lambda *a, **k: counting([loaded(*a, **k)], calls)[0])
    checkpoints = [str(p) for p in find_checkpoints(head_sweep)]
    five = [checkpoints[i % 2] for i in range(5)]  # an ensemble of five fold models on one encoder
    out = tmp_path / "out"
    predict(predict_config([f"ckpt_path=[{','.join(five)}]", f"images={images}", "progress=false"], out))
    rows = read_rows(out / "predictions.csv")
    assert calls[0] == sum(int(r["patches"]) for r in rows) == 48  # not 5 x 48
    assert {"prob_sd_CLL", "models_agree"} <= set(rows[0])


def test_a_bag_heads_prediction_equals_what_its_fold_recorded(bag_sweep: Path, tmp_path: Path) -> None:
    recorded = read_rows(bag_sweep / "0" / "bag_predictions.csv")  # fold 1's held-out images, by fold 1's model
    checkpoint = find_checkpoints(bag_sweep / "0")[0]
    out = tmp_path / "out"
    predict(predict_config([f"ckpt_path={checkpoint}", f"images=[{','.join(r['image'] for r in recorded)}]",
                            "labels=none", "progress=false"], out))
    rows = {r["image"]: r for r in read_rows(out / "predictions.csv")}
    assert len(rows) == len(recorded) == 6
    for r in recorded:
        new = rows[r["image"]]
        assert int(new["patches"]) == int(r["patches"]) == 8  # 4 windows x 2 rotations, as training cut them
        np.testing.assert_allclose([float(new[f"prob_{c}"]) for c in CLASSES],
                                   [float(r[f"prob_{c}"]) for c in CLASSES], atol=2e-6)
        assert new["predicted"] == r["predicted"]
    assert not (out / "report.json").exists()


def test_bag_heads_embed_each_window_once_and_report_labelled_images(bag_sweep: Path, images: Path,
                                                                     tmp_path: Path) -> None:
    paths = sorted(images.rglob("*.png"))
    found = {}
    for share in (False, True):
        calls = [0]
        models = counting([load_fold_model(p) for p in find_checkpoints(bag_sweep)], calls)
        pred = predict_bags(paths, models, device="cpu", progress=False, share=share)
        found[share] = (calls[0], pred)
    assert found[True][0] == found[True][1].encoder_passes == 12 * 8 and found[False][0] == 2 * 12 * 8
    np.testing.assert_allclose(found[True][1].probs, found[False][1].probs, atol=1e-6)
    out = tmp_path / "external"
    predict(predict_config([f"ckpt_path={bag_sweep}", f"images={images}", "progress=false"], out))
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 12 and report["settings"]["external"] and report["roc_auc"] is None  # 3 classes
    assert set(report["pooled"]) >= {"image/acc", "image/balanced_acc", "image/f1_macro"}
    low, high = report["interval"]["image/acc"]
    assert low <= report["pooled"]["image/acc"] <= high and 0 <= report["calibration"]["ece"] <= 1
    agreement = report["fold_agreement"]
    rows = read_rows(out / "predictions.csv")
    assert agreement["share"] == sum(r["models_agree"] == "True" for r in rows) / 12 and agreement["models"] == 2
    assert np.array(report["confusion_images"]).sum() == 12
    assert (out / "reliability_images.png").stat().st_size > 0 and "external validation" in (
        out / "report.md").read_text()


def test_labels_unknown_to_the_model_are_named_and_no_labels_means_predictions_only(
        head_sweep: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    new = make_images(tmp_path / "new", per_class=1, size=(72, 72), pixels="tint", seed=3)
    (new / "MCL").rename(new / "DLBCL")
    with pytest.raises(ConfigError, match=r"\['DLBCL'\] unknown to the model"):
        predict(predict_config([f"ckpt_path={head_sweep}", f"images={new}", "progress=false"], tmp_path / "a"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in new.rglob("*.png"):
        p.rename(flat / p.name)
    with caplog.at_level(logging.INFO):
        predict(predict_config([f"ckpt_path={head_sweep}", f"images={flat}", "progress=false"], tmp_path / "b"))
    assert len(read_rows(tmp_path / "b" / "predictions.csv")) == 3 and not (tmp_path / "b" / "report.json").exists()
    assert sum("carry no labels" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("override, said", [
    ("+encoder=mobilenet_v2_imagenet", r"encoder.name=mobilenet_v2 \(trained: squeezenet1_1\)"),
    ("+encoder.name=mobilenet_v2", r"encoder.name=mobilenet_v2 \(trained: squeezenet1_1\)"),
    ("grid.size=48", r"grid.size=48, but .* trained on 36-px windows"),
    ("grid.stride=16", r"grid.stride=16, but .* cut every 32 px"),
])
def test_a_setting_that_changes_what_a_bag_model_sees_is_refused_naming_both(
        bag_sweep: Path, images: Path, tmp_path: Path, override: str, said: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_predict, "predict_bags", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(CheckpointError, match=said):
        predict(predict_config([f"ckpt_path={bag_sweep}", f"images={images}", override, "progress=false"], tmp_path))


def test_the_kfold_report_reads_the_embeddings_training_cached(head_sweep: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    loaded = held_out.load_fold_model
    monkeypatch.setattr(held_out, "load_fold_model", lambda *a, **k: counting([loaded(*a, **k)], calls)[0])
    predict(predict_config([f"ckpt_path={head_sweep}", "progress=false"], tmp_path / "cached"))
    assert calls[0] == 0  # no window through the encoder
    monkeypatch.setattr(held_out, "cached_features", lambda *a, **k: None)  # the path before
    predict(predict_config([f"ckpt_path={head_sweep}", "progress=false"], tmp_path / "embedded"))
    assert calls[0] == 12 * 4  # each held-out image's 4 windows, once
    cached, embedded = (read_rows(tmp_path / d / "predictions.csv") for d in ("cached", "embedded"))
    assert [r["image"] for r in cached] == [r["image"] for r in embedded] and len(cached) == 12
    for a, b in zip(cached, embedded):
        assert (a["predicted"], a["patches"]) == (b["predicted"], b["patches"])
        np.testing.assert_allclose([float(a[f"prob_{c}"]) for c in CLASSES], [float(b[f"prob_{c}"]) for c in CLASSES],
                                   atol=2e-6)
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("cached", "embedded")]
    assert reports[0]["pooled"] == reports[1]["pooled"]


def test_an_ensembles_repeated_folds_keep_a_column_each() -> None:
    """Two multiruns' fold 1 and fold 2 (ckpt_path=[a,b]): four per-model columns, none overwriting another."""
    from types import SimpleNamespace

    from histoflow.inference.voting import fold_labels, value_columns

    models = [SimpleNamespace(fold=f, task=SimpleNamespace(name="survival")) for f in ("1", "2", "1", "2")]
    assert fold_labels(models) == ["1.1", "2.1", "1.2", "2.2"]
    assert fold_labels(models[:2]) == ["1", "2"]
    columns = value_columns(np.array([[1.0], [2.0], [3.0], [4.0]]), models)
    assert [columns[f"risk_fold{k}"] for k in ("1.1", "2.1", "1.2", "2.2")] == [1.0, 2.0, 3.0, 4.0]
    assert columns["risk"] == 2.5
