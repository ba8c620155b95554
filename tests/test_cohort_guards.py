"""A cohort's embedding and its bags never give a silently wrong result (issue 37): the index's own columns are the
index's, identical slides under two patients are one fold group, a slide table's mpp reaches the tiling and keys the
feature file, and damaged files, a full disk, odd names, another table of the same name and a GPU that is not there
are refused by name with the fix. On small made-up slides (pink tissue on the left half, glass on the right)."""

from __future__ import annotations

import csv
import errno
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_config

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.features.bags import cohort_bags
from histoflow.features.cohort import embed_cohort, prepare_job
from histoflow.features.cohort_job import CohortResult
from histoflow.features.slide_bags import SlideBagDataModule
from histoflow.features.slide_features import read_slide_features
from histoflow.slides.table import SlideTableError
from histoflow.testing.cohort_fixture import write_slide_tiff

SIDE = 32  # 32-px tiles at 1 micron per pixel into a SqueezeNet at 32 px


def tissue(seed: int, side: int = 256) -> np.ndarray:
    """A made-up slide: pink noisy tissue on the left half, white glass on the right."""
    rng = np.random.default_rng(seed)
    image = np.full((side, side, 3), 245, np.uint8)
    pink = np.array([200, 110, 170]) + rng.integers(-30, 30, (side, side // 2, 3))
    image[:, :side // 2] = np.clip(pink, 0, 255).astype(np.uint8)
    return image


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a..e.tif (five made-up slides, 1 micron per pixel), a-copy.tif (a's bytes) and glass.tif (no tissue)."""
    folder = tmp_path_factory.mktemp("slides")
    for seed, name in enumerate("abcde"):
        write_slide_tiff(folder / f"{name}.tif", tissue(seed), 1.0)
    shutil.copy(folder / "a.tif", folder / "a-copy.tif")
    write_slide_tiff(folder / "glass.tif", np.full((256, 256, 3), 245, np.uint8), 1.0)
    return folder


def write_table(path: Path, slides: Path, rows: list[str], header: str = "slide,patient,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(row.replace("@", f"{slides}/") for row in rows)]) + "\n")
    return path


def arguments(table: Path, out: Path, weights: Path, *extra: str) -> tuple:
    cfg = compose_config("embed", [
        f"slides={table}", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
        f"encoder.preprocess.input_size={SIDE}", f"slide.tile_size={SIDE}", "slide.mpp=1.0", "slide.backend=tifffile",
        "slide.progress=false", "slide.batch_size=16", "slide.num_workers=0", f"embed.out={out}",
        "on_bad_image=skip", *extra])
    return cfg.slides, to_builtin(cfg.encoder), to_builtin(cfg.slide), to_builtin(cfg.embed), cfg.on_bad_image


def embed(table: Path, out: Path, weights: Path, *extra: str) -> CohortResult:
    return embed_cohort(*arguments(table, out, weights, *extra))


def index_rows(index: Path) -> list[dict[str, str]]:
    with index.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ item 1


def test_table_columns_named_like_the_index_never_overwrite_it(slides: Path, weights: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A column `shard` naming one slide's shard on every row once made every bag that slide's tiles."""
    table = write_table(tmp_path / "cohort.csv", slides, ["@a.tif,P1,x,shards/elsewhere.npz,999,abc,1.5,7",
                                                          "@b.tif,P2,y,shards/elsewhere.npz,999,abc,1.5,7"],
                        "slide,patient,label,shard,tiles,sha256,seconds,row")
    with caplog.at_level(logging.WARNING):
        result = embed(table, tmp_path / "features", weights)
    rows = index_rows(result.index)
    assert [r["slide"] for r in rows] == [f"{slides}/a.tif", f"{slides}/b.tif"]
    for row in rows:
        assert row["shard"] != "shards/elsewhere.npz" and (result.folder / row["shard"]).is_file()
        assert row["tiles"] != "999" and row["sha256"] != "abc"
        assert row["table_shard"] == "shards/elsewhere.npz" and row["table_tiles"] == "999"
        assert row["table_row"] == "7"
    said = [r.message for r in caplog.records if "table_shard" in r.message]
    assert len(said) == 1 and "shard" in said[0]
    bags, _ = cohort_bags(result.index, ["x", "y"])
    assert [len(b) for b in bags] == [int(r["tiles"]) for r in rows]  # each slide its own tiles


# ------------------------------------------------------------------------------------------------ item 2


def bag_module(table: Path, weights: Path, out: Path, seed: int = 0) -> SlideBagDataModule:
    encoder = to_builtin(compose_config("embed", ["encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
                                             f"encoder.preprocess.input_size={SIDE}"]).encoder)
    slide = {"tile_size": SIDE, "mpp": 1.0, "backend": "tifffile", "progress": False, "batch_size": 16,
             "num_workers": 0}
    return SlideBagDataModule(fold=1, embed=SimpleNamespace(encoder=encoder), table=str(table),
                              split={"kind": "kfold", "k": 2, "seed": seed}, slide=slide,
                              features={"out": str(out), "accelerator": "cpu"}, bag={"level": "slide"})


def test_identical_slides_under_two_patients_are_one_fold_group(slides: Path, weights: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    table = write_table(tmp_path / "twins.csv", slides, ["@a.tif,P1,x", "@a-copy.tif,P2,x", "@e.tif,P5,x",
                                                         "@b.tif,P3,y", "@c.tif,P4,y"])
    bag_module(table, weights, tmp_path / "features").prepare_data()
    for seed in range(6):
        module = bag_module(table, weights, tmp_path / "features", seed)
        with caplog.at_level(logging.WARNING):
            module.setup("fit")
        role = {b.name: role for role, bags in module.bags.items() for b in bags}
        assert role[f"{slides}/a.tif"] == role[f"{slides}/a-copy.tif"], f"seed {seed}: a twin on each side"
    said = [r.message for r in caplog.records if "identical bytes" in r.message]
    assert said and "a.tif" in said[0] and "a-copy.tif" in said[0] and "'P1'" in said[0] and "'P2'" in said[0]


def test_identical_slides_under_two_labels_are_refused_naming_both(slides: Path, weights: Path,
                                                                    tmp_path: Path) -> None:
    table = write_table(tmp_path / "clash.csv", slides, ["@a.tif,P1,x", "@a-copy.tif,P2,y", "@e.tif,P5,x",
                                                         "@b.tif,P3,y", "@c.tif,P4,y"])
    module = bag_module(table, weights, tmp_path / "features")
    module.prepare_data()
    with pytest.raises(SlideTableError, match=r"a\.tif.*'x'.*a-copy\.tif.*'y'.*identical bytes.*two labels"):
        module.setup("fit")


# ------------------------------------------------------------------------------------------------ leftovers (a-c)


def test_a_tables_mpp_tiles_the_slide_and_keys_its_feature_file(slides: Path, weights: Path, tmp_path: Path) -> None:
    """The file says 1 micron per pixel; the table says 0.5: tiles of 32 microns are 64 file pixels, a quarter as
    many. The same slide without the column afterwards is not given the 0.5 one's features."""
    out = tmp_path / "features"
    said = embed(write_table(tmp_path / "t1" / "half.csv", slides, ["@a.tif,P1,x,0.5", "@b.tif,P2,y,"],
                             "slide,patient,label,mpp"), out, weights)
    file = embed(write_table(tmp_path / "t2" / "file.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"]), out, weights)
    (a_said, b_said), (a_file, b_file) = index_rows(said.index), index_rows(file.index)
    meta = read_slide_features(said.folder / a_said["shard"])["meta"]
    assert meta["mpp"] == 0.5
    assert read_slide_features(file.folder / a_file["shard"])["meta"]["mpp"] == 1.0
    assert a_said["shard"] != a_file["shard"] and int(a_said["tiles"]) * 3 < int(a_file["tiles"])
    assert b_said["shard"] == b_file["shard"]  # no mpp in the table: the file's, reused
    assert file.embedded == [f"{slides}/a.tif"] and file.reused == [f"{slides}/b.tif"]


def test_predict_takes_the_tables_mpp_per_slide(slides: Path, tmp_path: Path) -> None:
    from histoflow.deployment.slide_predict import _slide_files

    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x,0.5", "@b.tif,P2,y,"], "slide,patient,label,mpp")
    paths, _, mpps = _slide_files(str(table))
    assert [mpps[p] for p in paths] == [0.5, None]


def test_a_damaged_weights_file_leaves_no_features_folder(slides: Path, tmp_path: Path) -> None:
    weights = tmp_path / "damaged.pth"
    weights.write_text("<html>404 not found</html>\n")
    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"])
    with pytest.raises(HistoflowError, match="damaged.pth"):
        embed(table, tmp_path / "features", weights)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())


def test_no_tissue_names_the_key_of_every_command(slides: Path, weights: Path, tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x", "@glass.tif,P2,y"])
    result = embed(table, tmp_path / "features", weights)
    detail = (result.folder / "t.problems.csv").read_text()
    assert "no-tissue" in detail and "slide.tissue_threshold=0.02" in detail and "predict.py" not in detail


# ------------------------------------------------------------------------------------------------ items 6, 7


def test_another_table_of_the_same_name_is_refused(slides: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    first = embed(write_table(tmp_path / "one" / "cohort.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"]), out,
                  weights)
    before = first.index.read_text()
    other = write_table(tmp_path / "two" / "cohort.csv", slides, ["@c.tif,P3,x", "@d.tif,P4,y"])
    with pytest.raises(ConfigError, match=r"another slide table.*one/cohort\.csv.*embed\.name="):
        embed(other, out, weights)
    assert first.index.read_text() == before
    second = embed(other, out, weights, "embed.name=cohort_two")
    assert first.index.read_text() == before and len(index_rows(second.index)) == 2
    record = json.loads((first.folder / "cohort.table.json").read_text())
    assert record["table"] == str((tmp_path / "one" / "cohort.csv").resolve())
    edited = tmp_path / "one" / "cohort.csv"  # the same table, edited: its index is replaced
    edited.write_text(edited.read_text() + f"{slides}/e.tif,P5,x\n")
    assert len(index_rows(embed(edited, out, weights).index)) == 3


def test_a_resize_to_the_encoders_side_is_said_and_recorded(slides: Path, weights: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """squeezenet1_1_imagenet takes 64 px; the default tiles are 224 px at 0.5 micron per pixel."""
    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"])
    encoder = to_builtin(compose_config("embed", ["encoder=squeezenet1_1_imagenet",
                                                  f"encoder.weights={weights}"]).encoder)
    with caplog.at_level(logging.WARNING):
        job = prepare_job(table, encoder, {}, {"out": str(tmp_path / "features")})
    said = [r.message for r in caplog.records if "resize" in r.message or "shrunk" in r.message]
    assert len(said) == 1 and "1.75 µm/px" in said[0]
    assert "encoder.preprocess.input_size=224" in said[0] and "slide.tile_size=64" in said[0]
    assert json.loads((job.folder / "settings.json").read_text())["input"]["resize"] == 64
    with caplog.at_level(logging.WARNING):  # the encoder's own side: nothing to say, nothing resized
        same = prepare_job(table, encoder, {"tile_size": 64}, {"out": str(tmp_path / "features")})
    assert len([r for r in caplog.records if "shrunk" in r.message]) == 1
    assert json.loads((same.folder / "settings.json").read_text())["input"]["resize"] is None


# ------------------------------------------------------------------------------------------------ items 9, 10


def test_a_truncated_feature_file_is_embedded_again_and_named_by_readers(slides: Path, weights: Path,
                                                                         tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"])
    out = tmp_path / "features"
    first = embed(table, out, weights)
    shard = first.folder / index_rows(first.index)[0]["shard"]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])
    again = embed(table, out, weights)
    assert again.embedded == [f"{slides}/a.tif"] and again.reused == [f"{slides}/b.tif"]
    assert shard.read_bytes() == whole or len(read_slide_features(shard)["features"]) > 0

    shard.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(HistoflowError, match=rf"{shard.name}: a damaged slide feature file.*embedding again"):
        cohort_bags(again.index, ["x", "y"])


def test_a_full_disk_is_one_line_naming_the_folder(slides: Path, weights: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"])
    with pytest.raises(HistoflowError) as caught:
        embed(table, tmp_path / "features", weights)
    message = str(caught.value)
    assert "\n" not in message and "no space left" in message and "shards" in message and "embed.out" in message
    assert caught.value.__cause__ is None and caught.value.__context__ is None or caught.value.__suppress_context__


# ------------------------------------------------------------------------------------------------ items 14, 15


@pytest.mark.parametrize("name", ["../../evil", "a/b", ".."])
def test_a_name_that_is_a_path_is_refused(name: str, slides: Path, weights: Path, tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"])
    with pytest.raises(ConfigError, match=r"embed\.name=.*not a path"):
        prepare_job(*arguments(table, tmp_path / "features", weights, f"embed.name='{name}'")[:4])
    assert not any(p.name.endswith(".csv") for p in tmp_path.rglob("*") if "features" in p.parts)


def test_a_gpu_that_is_not_there_is_refused_by_key(slides: Path, weights: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    table = write_table(tmp_path / "t.csv", slides, ["@a.tif,P1,x", "@b.tif,P2,y"])
    with pytest.raises(ConfigError, match=r"embed\.accelerator=gpu: .*no GPU.*Fix: embed\.accelerator=auto"):
        embed(table, tmp_path / "features", weights, "embed.accelerator=gpu")
