"""Frozen features: the embedding equals the encoder's forward pass, is keyed and reused, resumes without
duplicates; heads train on it per fold, report like a net and predict new images through encoder + head."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train, make_images

from histoflow.common.errors import ConfigError
from histoflow.data.datamodule import ShardDataModule
from histoflow.data.prepare import prepare_dataset
from histoflow.data.shards import stack_npy, tar_samples
from histoflow.deployment.deploy import predict
from histoflow.features import embeddings
from histoflow.features.embeddings import RECORD
from histoflow.inference.fold_models import load_fold_model
from histoflow.inference.sweep_report import predict_config
from histoflow.models import build_encoder
from histoflow.training.checkpoints import CheckpointError
from histoflow.training.run import train

pytestmark = pytest.mark.usefixtures("leave_no_trace")
ENCODER = {"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1", "weights": None,
           "preprocess": {"input_size": 40, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225]}}


def with_weights(tmp: Path, seed: int) -> dict:
    """ENCODER with a weights file of its own (a random SqueezeNet drawn from seed)."""
    torch.manual_seed(seed)
    path = tmp / f"squeezenet-{seed}.pth"
    if not path.is_file():
        net = build_encoder({**ENCODER}, 40)[0]
        torch.save(net.state_dict(), path)
    return {**ENCODER, "weights": str(path)}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("embed") / "images", per_class=4, size=(72, 72), pixels="tint")


def data_config(images: Path, work: Path) -> dict:
    return {"name": "tiny", "root": str(images), "labels": "folder", "classes": ["CLL", "FL", "MCL"],
            "split": {"kind": "kfold", "k": 2, "val_fraction": 0.0, "seed": 0},
            "patches": {"size": 36, "stride": 32, "rotations": [0, 90]},
            "shards": {"dir": str(work), "samples_per_shard": 24, "workers": 1},
            "loader": {"crop": 32, "num_workers": 0, "batch_size": 16}}


def module_for(images: Path, work: Path, encoder: dict) -> ShardDataModule:
    return embeddings.encoder_datamodule(encoder, **data_config(images, work))


def shard_samples(path: Path) -> list[dict]:
    return list(tar_samples([{"url": str(path)}]))


@pytest.mark.parametrize("workers", [0, 2], ids=["read-by-a-thread", "two-loader-workers"])
def test_embeddings_equal_the_encoders_forward_pass(images: Path, tmp_path: Path, workers: int) -> None:
    encoder_cfg = with_weights(tmp_path, 0)
    data = data_config(images, tmp_path / "work")
    data["loader"]["num_workers"] = workers  # two workers each read whole shards, their batches interleaved here
    datamodule = embeddings.encoder_datamodule(encoder_cfg, **data)
    prepared = prepare_dataset(datamodule.data, quiet=True)
    features = datamodule.embeddings(prepared)
    encoder, dim = build_encoder(encoder_cfg, 40)
    assert features.dim == dim == 512
    transform = embeddings.fold_free_transform(prepared, asdict(datamodule.loader))
    assert len(prepared.record["shards"]) > 2 and features.record["samples"] == prepared.record["samples"]
    for shard in prepared.record["shards"]:
        patches = shard_samples(prepared.path / "shards" / shard["file"])
        vectors = shard_samples(features.path / shard["file"])
        assert [p["__key__"] for p in patches] == [v["__key__"] for v in vectors]
        assert [p["cls"] for p in patches] == [v["cls"] for v in vectors]
        with torch.inference_mode():
            direct = encoder(transform(torch.from_numpy(stack_npy([p["npy"] for p in patches]))))
        torch.testing.assert_close(torch.from_numpy(stack_npy([v["npy"] for v in vectors])), direct)


def test_embeddings_are_keyed_by_encoder_and_weights_and_reused(images: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    first = module_for(images, work, with_weights(tmp_path, 0))
    prepared = prepare_dataset(first.data, quiet=True)
    a = first.embeddings(prepared)
    other_weights = module_for(images, work, with_weights(tmp_path, 1)).embeddings(prepared)
    other_size = module_for(images, work, {**with_weights(tmp_path, 0), "preprocess": {
        **ENCODER["preprocess"], "input_size": 48}}).embeddings(prepared)
    assert len({a.path, other_weights.path, other_size.path}) == 3
    assert a.path.parent == prepared.path / "embeddings"
    hashes = json.loads((prepared.path / "embeddings" / embeddings.HASHES).read_text())  # read once per file
    assert {v["sha256"] for v in hashes.values()} >= {a.record["weights_sha256"],
                                                      other_weights.record["weights_sha256"]}
    # the same encoder again: found, nothing embedded (a moved weights file with the same bytes too)
    monkeypatch.setattr(embeddings, "embed_shards", lambda *a, **k: pytest.fail("embedded again"))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "squeezenet-0.pth").write_bytes(Path(with_weights(tmp_path, 0)["weights"]).read_bytes())
    assert module_for(images, work, {**ENCODER, "weights": str(moved / "squeezenet-0.pth")}).embeddings(
        prepared).path == a.path


def test_an_interrupted_embedding_resumes_without_duplicates(images: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule = module_for(images, tmp_path / "work", with_weights(tmp_path, 0))
    prepared = prepare_dataset(datamodule.data, quiet=True)
    real, written = embeddings.atomic_shard, []

    def dies_on_the_third(path: Path):  # killed as the third shard starts: two whole ones and a half one left
        if len(written) == 2:
            (path.parent / f".{path.name}.999.tmp").write_bytes(b"half a shard")  # what kill -9 leaves
            raise KeyboardInterrupt
        written.append(path.name)
        return real(path)

    monkeypatch.setattr(embeddings, "atomic_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        datamodule.embeddings(prepared)
    (out,) = [p for p in (prepared.path / "embeddings").iterdir() if p.is_dir()]
    assert not (out / RECORD).exists() and sorted(p.name for p in out.glob("*.tar")) == sorted(written)
    before = {name: (out / name).stat().st_mtime_ns for name in written}
    again: list[str] = []
    monkeypatch.setattr(embeddings, "atomic_shard", lambda path: again.append(path.name) or real(path))
    features = datamodule.embeddings(prepared)
    assert not set(again) & set(written) and len(again) + len(written) == len(prepared.record["shards"])
    assert {name: (out / name).stat().st_mtime_ns for name in written} == before
    assert not list(out.glob(".*.tmp"))
    keys = [s["__key__"] for shard in prepared.record["shards"] for s in shard_samples(features.path / shard["file"])]
    assert len(keys) == len(set(keys)) == prepared.record["samples"]


def test_shard_batches_mark_each_shards_last_batch(tmp_path: Path) -> None:
    """Whole batches, then the rest; the last one marked, also when it is full; an empty shard gives one empty batch."""
    shards = []
    for name, count in (("full.tar", 24), ("empty.tar", 0), ("rest.tar", 20)):
        with embeddings.atomic_shard(tmp_path / name) as tar:
            for i in range(count):
                embeddings.add_sample(tar, f"{name[:-4]}-{i}", i % 3, np.full((4, 4, 3), i, np.uint8))
        shards.append(tmp_path / name)
    got = [(index, len(keys), len(patches), last)
           for index, keys, _, patches, last in embeddings.ShardBatches(shards, batch_size=8)]
    assert got == [(0, 8, 8, False), (0, 8, 8, False), (0, 8, 8, True), (1, 0, 0, True),
                   (2, 8, 8, False), (2, 8, 8, False), (2, 4, 4, True)]


def test_a_run_stopped_mid_shard_leaves_whole_shards_only(images: Path, tmp_path: Path) -> None:
    """Stopped while two workers' shards are half written: both temporary files go, the shards written stay whole,
    and an empty patch shard gives an empty feature shard."""
    datamodule = module_for(images, tmp_path / "work", with_weights(tmp_path, 0))
    prepared = prepare_dataset(datamodule.data, quiet=True)
    sources = [prepared.path / "shards" / s["file"] for s in prepared.record["shards"]]
    empty = tmp_path / "empty.tar"
    with embeddings.atomic_shard(empty):
        pass
    out = tmp_path / "features"
    out.mkdir()
    pairs = [(src, out / src.name) for src in [empty, *sources]]
    calls = []

    def stops_on_the_fifth(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return x.flatten(1)[:, :8]

    transform = embeddings.fold_free_transform(prepared, asdict(datamodule.loader))
    with pytest.raises(KeyboardInterrupt):
        embeddings.embed_shards(pairs, stops_on_the_fifth, transform, 16, torch.device("cpu"), workers=2)
    assert not list(out.glob(".*.tmp"))
    for path in out.glob("*.tar"):  # complete, or absent
        source = next(src for src, dst in pairs if dst == path)
        assert len(shard_samples(path)) == len(shard_samples(source))
    count = embeddings.embed_shards(pairs, lambda x: x.flatten(1)[:, :8], transform, 16, torch.device("cpu"),
                                    workers=2)
    assert count == prepared.record["samples"] and shard_samples(out / "empty.tar") == []
    assert all(len(shard_samples(dst)) == len(shard_samples(src)) for src, dst in pairs)


def test_fold_dependent_normalisation_is_refused(images: Path, tmp_path: Path) -> None:
    data = data_config(images, tmp_path / "work")
    datamodule = embeddings.encoder_datamodule({**ENCODER, "preprocess": None}, **data)  # normalize=image: per fold
    with pytest.raises(ConfigError, match="one embedding serves every fold"):
        datamodule.embeddings(prepare_dataset(datamodule.data, quiet=True))


def head_overrides(images: Path, tmp: Path, weights: str) -> list[str]:
    return [f"data.root={images}", f"paths.data_dir={tmp / 'work'}", "protocol=images", "data.split.k=2",
            "data.split.val_fraction=0", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
            "encoder.preprocess.input_size=40", "model=linear_head", "optimizer=adamw", "optimizer.lr=0.05",
            "trainer.max_epochs=30", "++data.loader.num_workers=0", "++data.loader.batch_size=16",
            "callbacks.model_checkpoint.monitor=null", "logger=csv"]


def two_folds(overrides: list[str], sweep: Path) -> Path:
    """Folds 1 and 2 trained as the jobs 0 and 1 of a multirun in `sweep`."""
    for job, fold in enumerate((1, 2)):
        train(compose_train([*overrides, f"fold={fold}"], sweep / str(job), multirun=True))
    return sweep


def test_a_run_that_embeds_ends_where_one_that_finds_the_embeddings_ends(images: Path, tmp_path: Path) -> None:
    """The first run (which prepares the data and embeds them, building the encoder with random weights before its
    file's are loaded) and a second one (which finds both cached) train the same head: a figure does not depend on
    whether the cache was there."""
    overrides = [*head_overrides(images, tmp_path, with_weights(tmp_path, 0)["weights"]), "trainer.max_epochs=2",
                 "fold=1"]
    ends = []
    for run in ("embeds", "finds"):
        metrics = train(compose_train(overrides, tmp_path / run))
        ends.append(torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"])
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


@pytest.fixture(scope="module")
def head_sweep(images: Path, tmp_path_factory: pytest.TempPathFactory, leave_no_trace_module: None) -> Path:
    """Two folds of a linear head on frozen (random, seeded) SqueezeNet features, as a multirun's job folders."""
    tmp = tmp_path_factory.mktemp("heads")
    return two_folds(head_overrides(images, tmp, with_weights(tmp, 0)["weights"]), tmp / "multirun")


def kfold_report(sweep: Path, out: Path) -> tuple[dict, list[dict]]:
    predict(predict_config([f"ckpt_path={sweep}", "progress=false"], out))
    with (out / "predictions.csv").open() as f:
        return json.loads((out / "report.json").read_text()), list(csv.DictReader(f))


def test_a_heads_kfold_report_has_the_format_of_a_nets(head_sweep: Path, images: Path, tmp_path: Path) -> None:
    net_overrides = [o for o in head_overrides(images, tmp_path, "unused") if not o.startswith(("encoder", "model="))]
    net_sweep = two_folds([*net_overrides, "trainer.max_epochs=1"], tmp_path / "net")
    head_report, head_rows = kfold_report(head_sweep, tmp_path / "head-report")
    net_report, net_rows = kfold_report(net_sweep, tmp_path / "net-report")
    assert set(head_report) == set(net_report) and list(head_rows[0]) == list(net_rows[0])
    assert sorted(p.name for p in (tmp_path / "head-report").iterdir()) == sorted(
        p.name for p in (tmp_path / "net-report").iterdir())
    assert len(head_rows) == 12 == len(net_rows)
    # tinted classes: frozen random features and a linear head still tell them apart
    assert sum(r["label"] == r["predicted"] for r in head_rows) >= 8


def test_a_head_predicts_new_images_through_its_encoder(head_sweep: Path, images: Path, tmp_path: Path) -> None:
    checkpoint = next((head_sweep / "0" / "checkpoints").glob("last.ckpt"))
    model = load_fold_model(checkpoint)
    assert [name for name, _ in model.net.named_children()] == ["encoder", "head"]
    assert model.transform.out_side == 40 and model.transform.normalize == "fixed"
    new = make_images(tmp_path / "new", per_class=2, size=(72, 72), pixels="tint", seed=7)
    out = tmp_path / "predicted"
    predict(predict_config([f"ckpt_path={checkpoint}", f"images={new}", "progress=false"], out))
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(int(r["patches"]) > 0 for r in rows)
    probabilities = np.array([[float(r[f"prob_{c}"]) for c in ("CLL", "FL", "MCL")] for r in rows])
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_a_head_refuses_changed_encoder_weights(head_sweep: Path, tmp_path: Path) -> None:
    checkpoint = head_sweep / "0" / "checkpoints" / "last.ckpt"
    weights = Path(torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["config"][
        "encoder"]["weights"])
    original = weights.read_bytes()
    try:
        torch.manual_seed(5)
        torch.save(build_encoder({**ENCODER}, 40)[0].state_dict(), weights)
        with pytest.raises(CheckpointError, match="are not those its head was trained on"):
            load_fold_model(checkpoint)
    finally:
        weights.write_bytes(original)


def test_a_heads_checkpoint_works_from_any_folder_and_takes_moved_weights(images: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29.2: encoder weights given by a relative path were kept as given, so the head's checkpoint worked only
    from the folder it was trained in; a moved weights file had no way in."""
    weights = Path(with_weights(tmp_path, 0)["weights"])
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(compose_train([*head_overrides(images, tmp_path, weights.name), "fold=1", "trainer.max_epochs=2"], run))
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    assert saved["encoder"]["weights"] == str(weights.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert [name for name, _ in load_fold_model(checkpoint).net.named_children()] == ["encoder", "head"]
    moved = tmp_path / "models" / "squeezenet.pth"
    moved.parent.mkdir()
    weights.rename(moved)
    with pytest.raises(CheckpointError, match=r"Fix: pass encoder.weights=<that file>"):
        load_fold_model(checkpoint)
    new = make_images(tmp_path / "new", per_class=1, size=(72, 72), pixels="tint", seed=7)
    out = tmp_path / "predicted"
    predict(predict_config([f"ckpt_path={checkpoint}", f"images={new}", f"encoder.weights={moved}",
                            "progress=false"], out))
    assert (out / "predictions.csv").is_file()
    other = with_weights(tmp_path, 1)["weights"]
    with pytest.raises(CheckpointError, match="are not those its head was trained on"):
        load_fold_model(checkpoint, encoder_weights=other)
