"""Bags of frozen tile embeddings and the heads on them (issue 27): attention sums to one over a bag's real tiles;
padding and batch composition never change a bag's output; a bag's embeddings are the frozen encoder's forward of
its tiles; bad bags are listed or named; heads train per fold and write the k-fold report at the bag's level."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import test_embeddings
import torch
from conftest import compose_train, wandb_run_summary

from histoflow.common.errors import ConfigError
from histoflow.data.prepare import prepare_dataset
from histoflow.data.shards import parse_key, stack_npy, tar_samples
from histoflow.deployment.deploy import predict
from histoflow.features import embeddings
from histoflow.features.bags import Bag, BagDataModule, cohort_bags, image_bags, pad_bags, patient_bags
from histoflow.features.slide_features import write_slide_features
from histoflow.inference.fold_models import load_fold_model
from histoflow.inference.sweep_report import predict_config, write_image_report
from histoflow.models import ABMIL, MaxPool, MeanPool, build_encoder
from histoflow.training.checkpoints import CheckpointError
from histoflow.training.run import train

ENCODER = {"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1", "weights": None,
           "preprocess": {"input_size": 40, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225]}}
HEADS = [lambda: ABMIL(12, 3, hidden=8, attention=6, dropout=0.25), lambda: ABMIL(12, 3, hidden=None),
         lambda: MeanPool(12, 3), lambda: MeanPool(12, 3, hidden=8), lambda: MaxPool(12, 3, hidden=8)]


def random_bag(n: int, seed: int) -> Bag:
    g = torch.Generator().manual_seed(seed)
    return Bag(f"bag{seed}", seed % 3, torch.randn(n, 12, generator=g), np.zeros((n, 4), np.int64), "p", "1")


def test_attention_sums_to_one_over_a_bags_real_tiles() -> None:
    torch.manual_seed(0)
    head = ABMIL(12, 3).eval()
    x, mask, _, _ = pad_bags([(random_bag(n, i), i) for i, n in enumerate((1, 7, 30))])
    x[~mask] = 1e6  # whatever the padding holds
    a = head.attention_weights(x, mask)
    torch.testing.assert_close(a.sum(1), torch.ones(3))
    assert (a[~mask] == 0).all() and (a[mask] > 0).all()


@pytest.mark.parametrize("make", HEADS)
def test_padding_and_batch_composition_never_change_a_bags_output(make) -> None:
    torch.manual_seed(0)
    head = make().eval()
    bag = random_bag(5, 0)
    with torch.no_grad():
        alone = head(bag.features[None])
        others = [random_bag(n, s) for s, n in ((1, 40), (2, 3), (3, 17))]
        for batch in ([bag, *others], [*others, bag], [others[0], bag]):
            x, mask, _, _ = pad_bags([(b, i) for i, b in enumerate(batch)])
            x[~mask] = float("nan")  # padding never reaches an output, NaN included
            out = head(x, mask)
            torch.testing.assert_close(out[batch.index(bag)][None], alone, rtol=1e-5, atol=1e-6)
            assert torch.isfinite(out).all()


def test_a_bag_without_a_tile_is_refused_by_the_heads_and_listed_when_bags_are_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without a real tile"):
        ABMIL(12, 3)(torch.zeros(2, 4, 12), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).bool())
    manifest = [{"index": 0, "image": "CLL/a.png", "label": "CLL", "group": "p1", "fold": "1"}]
    bags, problems = image_bags([], manifest, ["CLL", "FL", "MCL"])
    assert bags == [] and [(p.path, p.kind) for p in problems] == [("CLL/a.png", "no-tile")]


def test_a_patient_whose_images_disagree_is_an_error_naming_the_patient() -> None:
    a, b, c = random_bag(3, 0), random_bag(4, 1), random_bag(2, 3)  # labels 0, 1, 0
    a.group, b.group, c.group = "case-7", "case-7", "case-8"
    with pytest.raises(ConfigError, match="patient case-7"):
        patient_bags([a, b, c], ["CLL", "FL", "MCL"])
    b.label = 0
    (p7, p8) = patient_bags([a, b, c], ["CLL", "FL", "MCL"])
    assert (p7.name, len(p7), p8.name, len(p8)) == ("case-7", 7, "case-8", 2)


images = test_embeddings.images  # a fixture: 4 tinted 72-px images a class
data_config = test_embeddings.data_config  # a 2-fold data set of them, 36-px patches at stride 32


def test_a_bags_embeddings_equal_the_frozen_encoders_forward_of_its_tiles(images: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.pth"
    torch.save(build_encoder(ENCODER, 40)[0].state_dict(), weights)
    encoder_cfg = {**ENCODER, "weights": str(weights)}
    data = data_config(images, tmp_path / "work")
    module = BagDataModule(fold=1, preprocess=embeddings.input_preprocess(None, encoder_cfg),
                           embed=embeddings.Embedder(encoder_cfg, "cpu"), bag={"batch_size": 4}, **data)
    module.prepare_data()
    module.setup("fit")
    prepared = prepare_dataset(data, quiet=True)
    patches: dict[int, dict] = {}  # image -> (x, y, rot) -> the uint8 patch
    for shard in prepared.record["shards"]:
        for s in tar_samples([{"url": str(prepared.path / "shards" / shard["file"])}]):
            k = parse_key(s["__key__"])
            patches.setdefault(k["image"], {})[(k["x"], k["y"], k["rot"])] = s["npy"]
    encoder, _ = build_encoder(encoder_cfg, 40)
    transform = embeddings.fold_free_transform(prepared, asdict(module.loader))
    bags = module.bags["train"] + module.bags["test"]
    assert len(bags) == 12 and all(len(b) == 8 for b in bags) and {b.fold for b in module.bags["test"]} == {"1"}
    for bag in bags[:3] + module.bags["test"][:2]:
        index = int(bag.coords[0, 0])
        tiles = stack_npy([patches[index][tuple(c[1:])] for c in bag.coords])
        with torch.inference_mode():
            direct = encoder(transform(torch.from_numpy(tiles)))
        torch.testing.assert_close(bag.features, direct)
    x, mask, y, idx = next(iter(module.train_dataloader()))
    assert x.shape == (4, 8, 512) and mask.all() and len(y) == len(idx) == 4


def test_abmil_trains_per_fold_and_writes_the_bag_level_report(images: Path, tmp_path: Path, leave_no_trace: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.pth"
    torch.save(build_encoder(ENCODER, 40)[0].state_dict(), weights)
    overrides = [f"data.root={images}", f"paths.data_dir={tmp_path / 'work'}", "protocol=images", "data.split.k=2",
                 "data.split.val_fraction=0", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
                 "encoder.preprocess.input_size=40", "model=abmil", "model.hidden=null", "optimizer=adamw",
                 "optimizer.lr=0.01", "trainer.max_epochs=20", "++data.loader.num_workers=0", "bag.batch_size=4",
                 "callbacks.model_checkpoint.monitor=null", "logger=csv"]
    sweep = tmp_path / "multirun"
    for job, fold in enumerate((1, 2)):
        metrics = train(compose_train([*overrides, f"fold={fold}"], sweep / str(job), multirun=True))
        assert 0 <= metrics["test/acc_micro"] <= 1 and (sweep / str(job) / "bag_predictions.csv").is_file()
    with np.load(sweep / "0" / "attention.npz") as z:
        np.testing.assert_allclose(z["attention_0"].sum(), 1.0, rtol=1e-5)
        assert z["coords_0"].shape == (8, 4)
    write_image_report(sweep)
    report = json.loads((sweep / "image_report" / "report.json").read_text())
    assert report["images"] == 12 and set(report["per_fold"]) == {"fold 1", "fold 2"}
    assert report["settings"]["aggregate"].startswith("bag (ABMIL")
    assert report["pooled"]["image/acc"] >= 0.75  # tinted classes: the bag head learns them
    assert not list(sweep.rglob("wandb")) and report["keys"]["report/acc"] == report["pooled"]["image/acc"]
    # Issue 42: had the folds logged to W&B, the bag report is one more run in their group, its gallery with it
    for job, fold in enumerate((1, 2)):
        (sweep / str(job) / ".hydra").mkdir()
        (sweep / str(job) / ".hydra" / "config.yaml").write_text(
            f"name: tiny-abmil\nfold: {fold}\nlogger:\n  wandb:\n    _target_: histoflow.training.loggers.WandbLogger\n"
            "    project: histoflow\n    group: ${name}\n")
        (sweep / str(job) / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime: {}\n  job: {}\n")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    write_image_report(sweep)
    (offline,) = (sweep / "image_report" / "wandb").glob("offline-run-*")
    run, summary = wandb_run_summary(next(offline.glob("run-*.wandb")))
    assert (run.run_group, run.job_type) == ("tiny-abmil", "report")
    assert summary["report/acc"] == report["pooled"]["image/acc"]
    assert (offline / "files" / summary["report/attention_gallery/path"]).is_file()
    assert (sweep / "image_report" / "attention_gallery.png").stat().st_size > 0
    maps = sorted((sweep / "image_report" / "attention_maps").glob("*.tiles.csv"))
    assert len(maps) == 12  # an image bag's map: its windows (both rotations summed), weights adding up to one
    tiles = np.genfromtxt(maps[0], delimiter=",", names=True)
    assert len(tiles) == 4 and abs(tiles["attention"].sum() - 1) < 1e-4
    low, high = report["interval"]["image/acc"]
    assert low <= report["pooled"]["image/acc"] <= high and report["colour_baselines"]
    assert load_fold_model(next((sweep / "0" / "checkpoints").glob("*.ckpt"))).is_bag  # predicts images (test_deploy)
    with pytest.raises(CheckpointError, match="a head on bags; its multirun's k-fold report"):  # said, no traceback
        predict(predict_config([f"ckpt_path={sweep}", "progress=false"], tmp_path / "report"))
    # resumed from the job's last checkpoint: two more epochs of 2 batches (6 training bags, 4 a batch)
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 40
    train(compose_train([*overrides, "fold=1", "ckpt_path=last", "trainer.max_epochs=22"], sweep / "0", multirun=True))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 44


def test_balanced_sampling_draws_the_classes_alike() -> None:
    module = BagDataModule(bag={"balanced": True, "batch_size": 8}, name="x")
    module.num_classes = 3
    module.bags = {"train": [random_bag(2, 0)] * 40 + [random_bag(2, 1)] * 4 + [random_bag(2, 2)] * 4}
    loader = module.train_dataloader()  # once a fit, as Lightning asks: its draws go on from epoch to epoch
    labels = torch.cat([batch[2] for _ in range(20) for batch in loader])
    counts = torch.bincount(labels, minlength=3) / len(labels)
    assert (counts - 1 / 3).abs().max() < 0.08  # unbalanced: 0.83 / 0.08 / 0.08


def test_slide_and_patient_bags_from_a_cohorts_feature_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = ["slide,patient,label,tiles,shard,seconds,sha256"]
    for i, (patient, label, tiles) in enumerate((("p1", "CLL", 5), ("p1", "CLL", 3), ("p2", "FL", 0),
                                                 ("p3", "MCL", 2))):
        features = np.random.default_rng(i).normal(size=(tiles, 12)).astype(np.float32)
        px = np.arange(tiles * 2).reshape(tiles, 2)
        write_slide_features(shards / f"s{i}.npz", features, px, px * 0.5,
                             {"slide": f"s{i}"})
        rows.append(f"s{i}.svs,{patient},{label},{tiles},shards/s{i}.npz,1.0,x")
    rows.append("gone.svs,p4,FL,3,shards/gone.npz,1.0,x")
    (tmp_path / "cohort.index.csv").write_text("\n".join(rows) + "\n")
    classes = ["CLL", "FL", "MCL"]
    slides, problems = cohort_bags(tmp_path / "cohort.index.csv", classes)
    assert [(b.name, len(b), b.group) for b in slides] == [("s0.svs", 5, "p1"), ("s1.svs", 3, "p1"),
                                                           ("s3.svs", 2, "p3")]
    assert sorted((p.path, p.kind) for p in problems) == [("gone.svs", "no-shard"), ("s2.svs", "no-tile")]
    np.testing.assert_array_equal(slides[0].coords_um, slides[0].coords[:, 1:3] * 0.5)  # (row, x, y, 0)
    assert [set(b.coords[:, 0]) for b in slides] == [{0}, {1}, {3}]
    patients, _ = cohort_bags(tmp_path / "cohort.index.csv", classes, level="patient")
    assert [(b.name, len(b), b.coords_um.shape) for b in patients] == [("p1", 8, (8, 2)), ("p3", 2, (2, 2))]
    (tmp_path / "cohort.index.csv").write_text("\n".join([*rows, "s3b.svs,p3,FL,2,shards/s3.npz,1.0,x"]) + "\n")
    with pytest.raises(ConfigError, match="patient p3"):
        cohort_bags(tmp_path / "cohort.index.csv", classes, level="patient")
