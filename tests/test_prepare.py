"""Data preparation: sources, folds, patches, shards, means, resume and bad inputs."""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import CLASSES, compose_config, config, make_images, write_cases
from omegaconf import OmegaConf
from PIL import Image

from histoflow.data.dataset import PreparedDataset
from histoflow.data.folds import (
    LeakageError,
    SplitConfig,
    assign_folds,
    check_leakage,
    validation_gaps,
)
from histoflow.data.patches import PatchConfig, extract_patches, grid_origins
from histoflow.data.prepare import DataConfig, _resolve, prepare_dataset
from histoflow.data.problems import BadInputError
from histoflow.data.shards import decode_npy, parse_key
from histoflow.data.sources import SourceConfig, list_images

REPO = Path(__file__).resolve().parents[1]


def read_shard(path: str) -> list[tuple[str, np.ndarray, int]]:
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".", 1)[0] for name in members})
    return [(k, decode_npy(members[f"{k}.npy"]), int(members[f"{k}.cls"])) for k in keys]


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, PreparedDataset]:
    root = make_images(tmp_path / "images")
    return root, prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)


def test_grid_positions_and_counts() -> None:
    xs, ys = grid_origins(height=100, width=140, size=36, stride=32)
    # columns 0,32,64,96 (96+36=132 <= 140, 128+36 > 140); rows 0,32,64 (64+36=100)
    assert xs.tolist() == [0, 32, 64, 96] * 3
    assert ys.tolist() == [0] * 4 + [32] * 4 + [64] * 4
    image = np.random.default_rng(1).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    patches, px, py, rots = extract_patches(image, PatchConfig(size=36, stride=32, rotations=[0, 90, 180]))
    assert patches.shape == (36, 36, 36, 3) and PatchConfig(rotations=[0, 90, 180]).count(100, 140) == 36
    for p, x, y, r in zip(patches, px, py, rots):
        assert np.array_equal(p, np.rot90(image[y:y + 36, x:x + 36], k=r // 90))
    assert extract_patches(image[:30], PatchConfig())[0].shape[0] == 0


def test_background_filter_drops_white_patches() -> None:
    image = np.full((64, 128, 3), 255, np.uint8)
    image[:, :64] = 120  # left half tissue
    kept, xs, _, _ = extract_patches(image, PatchConfig(size=32, stride=32, rotations=[0], min_tissue=0.5))
    assert sorted(xs.tolist()) == [0, 0, 32, 32]
    assert len(extract_patches(image, PatchConfig(size=32, stride=32, rotations=[0]))[0]) == 8


def test_every_patch_in_the_shards_is_the_crop_of_its_image(tiny) -> None:
    root, ds = tiny
    rows = {r["index"]: r for r in ds.manifest()}
    images = {i: np.asarray(Image.open(root / r["image"]).convert("RGB")) for i, r in rows.items()}
    seen = []
    for s in ds.record["shards"]:
        for key, patch, label in read_shard(str(ds.path / "shards" / s["file"])):
            k = parse_key(key)
            r = rows[k["image"]]
            crop = images[k["image"]][k["y"]:k["y"] + 36, k["x"]:k["x"] + 36]
            assert np.array_equal(patch, np.rot90(crop, k=k["rot"] // 90)), key
            assert label == CLASSES.index(r["label"])
            assert r["fold"] == s["fold"] and ("val" if r["val"] else "fit") == s["part"]
            seen.append(key)
    # 80x64 image: columns 0,32 and row 0 -> 2 windows x 2 rotations per image
    assert len(seen) == len(set(seen)) == len(rows) * 4 == ds.record["samples"]


def test_folds_are_deterministic_grouped_and_stratified() -> None:
    labels = ["a"] * 30 + ["b"] * 20
    groups = [f"p{i // 2}" for i in range(50)]  # two images per patient
    f1, v1 = assign_folds(labels, groups, SplitConfig(k=5, seed=3))
    f2, v2 = assign_folds(labels, groups, SplitConfig(k=5, seed=3))
    f3, _ = assign_folds(labels, groups, SplitConfig(k=5, seed=4))
    assert (f1, v1) == (f2, v2) and f1 != f3
    for g in set(groups):
        assert len({(f, v) for f, v, gg in zip(f1, v1, groups) if gg == g}) == 1
    for fold in "12345":
        assert [lab for lab, f in zip(labels, f1) if f == fold].count("a") == 6  # 30 / 5
    rows = [{"image": f"i{i}", "group": g, "sha256": str(i), "fold": f, "val": v}
            for i, (g, f, v) in enumerate(zip(groups, f1, v1))]
    check_leakage(rows)
    rows[1]["fold"] = "5" if rows[0]["fold"] != "5" else "4"  # move half of patient p0
    with pytest.raises(LeakageError, match="i0, i1"):
        check_leakage(rows)


def test_validation_gaps_name_the_classes_a_training_run_cannot_validate() -> None:
    labels = ["a"] * 4 + ["b"] * 4
    folds = ["1", "1", "2", "2", "1", "1", "2", "2"]
    assert validation_gaps(labels, folds, [True, False, False, False, False, False, True, False]) == {
        "1": ["a"], "2": ["b"]}  # holding out fold 1 leaves only fold 2's val image, of class b
    assert validation_gaps(labels, folds, [True, False, True, False, True, False, True, False]) == {}
    assert validation_gaps(labels, folds, [False] * 8) == {}  # no validation split: nothing to select on


def test_class_aware_validation_gives_every_run_every_class() -> None:
    # the lymphoma shape: 37 slide blocks of ~8 images; a share of each fold leaves classes out of validation
    sizes = {"CLL": 11, "FL": 14, "MCL": 12}
    labels = [c for c, n in sizes.items() for _ in range(n * 8)]
    groups = [f"{c}/{i // 8}" for c, n in sizes.items() for i in range(n * 8)]
    shared = assign_folds(labels, groups, SplitConfig(k=5, val_fraction=0.1))
    assert validation_gaps(labels, *shared)  # the problem this option exists for
    folds, val = assign_folds(labels, groups, SplitConfig(k=5, val_fraction=0.1, val_groups_per_class=2))
    assert folds == shared[0]  # the folds themselves do not change
    assert validation_gaps(labels, folds, val) == {}
    flagged = {(g, f, lab) for g, f, lab, v in zip(groups, folds, labels, val) if v}
    assert len(flagged) == 6 and len({g for g, _, _ in flagged}) == 6  # two whole groups of each class
    for c in sizes:
        assert len({f for _, f, lab in flagged if lab == c}) == 2  # in two different folds
    for g in set(groups):  # a group is validated whole or not at all
        assert len({v for gg, v in zip(groups, val) if gg == g}) == 1
    assert (folds, val) == assign_folds(labels, groups, SplitConfig(k=5, val_groups_per_class=2))  # seeded


def test_fraction_split_proportions() -> None:
    labels = ["a"] * 50 + ["b"] * 50
    folds, val = assign_folds(labels, [str(i) for i in range(100)], SplitConfig(kind="fractions"))
    assert {f: folds.count(f) for f in set(folds)} == {"train": 40, "val": 20, "test": 40}
    assert all(v == (f == "val") for f, v in zip(folds, val))


def test_manifest_is_reused_and_the_split_leak_free(tiny, tmp_path: Path) -> None:
    root, ds = tiny
    again = prepare_dataset(config(root, tmp_path / "elsewhere"), quiet=True)
    assert (ds.path / "manifest.csv").read_bytes() == (again.path / "manifest.csv").read_bytes()
    rows = ds.manifest()
    check_leakage(rows)
    assert {r["fold"] for r in rows} == {"1", "2", "3"} and any(r["val"] for r in rows)
    split = ds.split(2)
    assert split.test and all("/2-" in p for p in split.test)
    assert not set(split.train) & set(split.val) and all("-val-" in p for p in split.val)
    assert sum(split.samples.values()) == ds.record["samples"]
    with pytest.raises(ValueError, match="choose one of"):
        ds.split(7)


def test_fold_means_equal_brute_force(tiny) -> None:
    root, ds = tiny
    for fold in ds.test_folds:
        patches = [p for path in ds.split(fold).train for _, p, _ in read_shard(path)]
        stack = np.stack(patches).astype(np.float64)
        stats = ds.stats(fold)
        assert stats["count"] == len(patches)
        np.testing.assert_allclose(stats["mean_image"], stack.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats["channel_mean"], stack.mean(axis=(0, 1, 2)), rtol=1e-12)
        np.testing.assert_allclose(stats["channel_std"], stack.std(axis=(0, 1, 2)), rtol=1e-9)


def test_rerun_does_nothing_and_changed_settings_use_a_new_folder(tiny, tmp_path: Path) -> None:
    root, ds = tiny
    stamps = {p: p.stat().st_mtime_ns for p in ds.path.rglob("*")}
    same = prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    assert same.path == ds.path and stamps == {p: p.stat().st_mtime_ns for p in ds.path.rglob("*")}
    other = prepare_dataset(config(root, tmp_path / "prepared", patches={"stride": 16}), quiet=True)
    assert other.path != ds.path and other.record["samples"] > ds.record["samples"]


def test_folders_prepared_before_keep_their_names(tmp_path: Path) -> None:
    """The folder names today's prepared data sets have (uncompressed images, so the bytes hashed are the same on
    every machine): a change in how the config is read must find them again, not prepare them anew."""
    root = write_cases(make_images(tmp_path / "images", per_class=4, suffix=".bmp"))
    yaml = compose_config("prepare", [f"data.root={root}", f"data.shards.dir={tmp_path}", "data.classes=null"])
    named = {"tiny-26637170cf34": config(root, tmp_path),
             "tiny-882947d3e0cf": config(root, tmp_path, on_bad_image="skip"),
             "tiny-da7057cf6d2d": config(root, tmp_path, groups="cases.csv", split={"val_groups_per_class": 1, "k": 2}),
             "tiny-9234cb938aec": config(root, tmp_path, patches={"size": None, "resize": 40},
                                         split={"kind": "fractions"}),
             "lymphoma-00661987d90d": OmegaConf.to_container(yaml.data, resolve=True)}
    assert [_resolve(DataConfig.from_config(data)).out.name for data in named.values()] == list(named)


def test_resume_after_interruption_is_byte_identical(tiny, tmp_path: Path) -> None:
    root, ds = tiny
    reference = {p.name: p.read_bytes() for p in (ds.path / "shards").glob("*.tar")}
    assert len(reference) > 3
    # as a kill mid-way leaves it: no completion record, some shards missing, a half-written temp file
    (ds.path / "dataset.json").unlink()
    for name in sorted(reference)[::2]:
        (ds.path / "shards" / name).unlink()
    (ds.path / "shards" / f".{sorted(reference)[0]}.123.tmp").write_bytes(b"half a shard")
    resumed = prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    assert {p.name: p.read_bytes() for p in (resumed.path / "shards").glob("*.tar")} == reference
    assert not list((resumed.path / "shards").glob(".*"))


def test_kill_9_mid_way_then_resume(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=20)
    data = config(root, tmp_path / "prepared", shards={"samples_per_shard": 4})
    script = f"from histoflow.data.prepare import prepare_dataset; prepare_dataset({data!r}, quiet=True)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "prepared").glob("*/shards/*.tar")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before writing a shard"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = next((tmp_path / "prepared").iterdir())
    assert not (out / "dataset.json").exists(), "the run finished before it could be killed"
    resumed = prepare_dataset(data, quiet=True)
    fresh = prepare_dataset(config(root, tmp_path / "fresh", shards={"samples_per_shard": 4}), quiet=True)
    shards = sorted(p.name for p in (fresh.path / "shards").glob("*.tar"))
    assert sorted(p.name for p in (resumed.path / "shards").glob("*.tar")) == shards
    for name in shards:
        assert (resumed.path / "shards" / name).read_bytes() == (fresh.path / "shards" / name).read_bytes()
    assert resumed.record["samples"] == fresh.record["samples"] == 60 * 4


def test_workers_write_the_same_shards_as_one_process(tiny, tmp_path: Path) -> None:
    root, ds = tiny
    two = prepare_dataset(config(root, tmp_path / "two", shards={"workers": 2}), quiet=True)
    for p in (ds.path / "shards").glob("*.tar"):
        assert (two.path / "shards" / p.name).read_bytes() == p.read_bytes()


# ---------------------------------------------------------------- sources


def test_prefix_labels_and_group_regex_blocks(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for c in CLASSES:
        for i in range(10):
            Image.new("RGB", (40, 40), (i, 0, 0)).save(flat / f"{c}-{i}.png")
    cfg = SourceConfig(root=str(flat), labels="prefix", label_regex=r"^([A-Z]+)-", group_regex=r"-(\d+)\.",
                       group_block=4)
    records, problems = list_images(cfg, flat)
    assert not problems and len(records) == 30
    by_name = {r.path: r for r in records}
    assert by_name["FL-3.png"].label == "FL"
    assert by_name["FL-3.png"].group == by_name["FL-0.png"].group == "FL/0" != by_name["FL-4.png"].group


def test_csv_labels_with_patient_groups(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=2)
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "group"])
        for c in CLASSES:
            w.writerows([[f"{c}/{c}-0.png", c, f"patient-{c}"], [f"{c}/{c}-1.png", c, f"patient-{c}"]])
        w.writerow(["CLL/missing.png", "CLL", "x"])
    records, problems = list_images(SourceConfig(labels="csv", csv=str(table)), root)
    assert {r.group for r in records} == {f"patient-{c}" for c in CLASSES} and len(records) == 6
    assert [p.kind for p in problems] == ["missing"]


def test_converted_images_are_kept_with_a_note(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=3)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8)).save(root / "CLL" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8)).save(root / "FL" / "rgba.png")
    sixteen = rng.integers(0, 65536, (64, 80, 3), dtype=np.uint16)
    tifffile.imwrite(root / "MCL" / "deep.tif", sixteen)
    ds = prepare_dataset(config(root, tmp_path / "out"), quiet=True)
    notes = {Path(r["path"]).name: r["detail"] for r in csv.DictReader(open(ds.path / "problems.csv"))}
    assert notes == {"gray.png": "grayscale to RGB", "rgba.png": "alpha dropped", "deep.tif": "16-bit to 8-bit"}
    row = next(r for r in ds.manifest() if r["image"] == "MCL/deep.tif")
    patch = next(p for s in ds.record["shards"] for k, p, _ in read_shard(str(ds.path / "shards" / s["file"]))
                 if parse_key(k) == {"image": row["index"], "x": 0, "y": 0, "rot": 0})
    np.testing.assert_array_equal(patch, np.round(sixteen[:36, :36] * (255 / 65535)).astype(np.uint8))


def make_bad_inputs(root: Path) -> dict[str, str]:
    """One of every bad input next to good images; returns file name -> expected problem kind."""
    make_images(root, per_class=6)
    good = (root / "CLL" / "CLL-0.png").read_bytes()
    (root / "CLL" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "FL" / "notes.txt").write_text("not an image")
    (root / "FL" / "fake.png").write_text("not an image either")
    Image.new("RGB", (20, 20)).save(root / "MCL" / "tiny.png")
    (root / "EMPTY").mkdir()  # not a problem: data.classes leaves it out (an empty listed class: test_reliability)
    (root / "OTHER").mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "OTHER" / "stray.png")
    shutil.copy(root / "MCL" / "MCL-1.png", root / "FL" / "copy-of-mcl.png")
    return {"truncated.png": "corrupt", "notes.txt": "not-an-image", "fake.png": "corrupt", "tiny.png": "too-small",
            "stray.png": "unknown-class", "copy-of-mcl.png": "conflicting-labels",
            "MCL-1.png": "conflicting-labels"}


def test_bad_inputs_are_all_named_in_one_error(tmp_path: Path) -> None:
    expected = make_bad_inputs(tmp_path / "images")
    data = config(tmp_path / "images", tmp_path / "out")
    with pytest.raises(BadInputError) as err:  # listing problems first ...
        prepare_dataset(data, quiet=True)
    listed = {Path(p.path).name: p.kind for p in err.value.problems}
    assert listed == {k: v for k, v in expected.items() if v in ("not-an-image", "empty-class", "unknown-class")}
    assert "on_bad_image=skip" in str(err.value) and "notes.txt" in str(err.value)
    for name in ("notes.txt", "EMPTY", "OTHER"):  # ... then, once those are fixed, the decoded ones
        target = tmp_path / "images" / ("FL" if name == "notes.txt" else "") / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(BadInputError) as err:
        prepare_dataset(data, quiet=True)
    listed = {Path(p.path).name: p.kind for p in err.value.problems}
    assert listed == {k: v for k, v in expected.items() if v in ("corrupt", "too-small", "conflicting-labels")}
    assert "fix: remove the image or lower data.patches.size" in str(err.value)


def test_skip_bad_inputs_reports_them_and_keeps_the_rest(tmp_path: Path) -> None:
    expected = make_bad_inputs(tmp_path / "images")
    ds = prepare_dataset(config(tmp_path / "images", tmp_path / "out", on_bad_image="skip"), quiet=True)
    report = {Path(r["path"]).name: r["kind"] for r in csv.DictReader(open(ds.path / "problems.csv"))
              if r["action"] == "skipped"}
    assert report == expected
    kept = {Path(r["image"]).name for r in ds.manifest()}
    assert len(kept) == 18 - 1 and not kept & set(expected)  # MCL-1.png left out with its copy


def test_unwritable_output_dir_is_a_clear_error(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=3)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="a-file.*data.shards.dir"):
        prepare_dataset(config(root, blocker / "prepared"), quiet=True)


def test_missing_root_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.root=.*nowhere.*Fix"):
        prepare_dataset(config(tmp_path / "nowhere", tmp_path / "out"), quiet=True)


# ---------------------------------------------------------------- command line and real data


def test_prepare_command_line(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=5)
    result = subprocess.run(
        [sys.executable, "-m", "histoflow", "prepare", f"data.root={root}", f"paths.data_dir={tmp_path / 'work'}",
         f"paths.log_dir={tmp_path / 'logs'}", "data.split.k=3", "data.shards.workers=1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "manifest:" in result.stdout and str(tmp_path / "work" / "prepared") in result.stdout
    record = next((tmp_path / "work" / "prepared").glob("lymphoma-*/dataset.json"))
    assert PreparedDataset(record.parent).record["images"] == 15


def test_real_lymphoma_images(lymphoma_dir: Path, tmp_path: Path) -> None:
    data = config(lymphoma_dir, tmp_path / "out", split={"k": 5, "val_fraction": 0.1},
                  shards={"samples_per_shard": 4096, "workers": 2})
    ds = prepare_dataset(data, quiet=True)
    rows = ds.manifest()
    assert len(rows) == 282 and {r["label"] for r in rows} == set(CLASSES)
    # 417 x 312: 12 columns x 9 rows of 36-px windows at stride 32, two rotations
    assert ds.record["samples"] == 282 * 12 * 9 * 2
    check_leakage(rows)
    sizes = [sum(r["fold"] == f for r in rows) for f in ds.test_folds]
    assert max(sizes) - min(sizes) <= 3
    for f in ds.test_folds:
        mean = ds.stats(f)["channel_mean"]
        assert np.all((mean > 50) & (mean < 200))
