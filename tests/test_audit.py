"""Leak audit: planted near-duplicates are named, per-image folds of patients' images are leaky, patient folds
are clean, and on the real lymphoma images per-image and block folds are flagged while case folds pass."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

import histoflow.data.audit as audit_module
from histoflow.commands.audit import audit_prepared
from histoflow.data.audit import audit, describe
from histoflow.data.folds import SplitConfig, assign_folds
from histoflow.data.images import read_rgb
from histoflow.data.prepare import prepare_dataset


def patients(n: int = 12, per_patient: int = 5, seed: int = 0) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Images of `n` patients: each patient its own stain (tint) and grain, each image another field."""
    rng = np.random.default_rng(seed)
    images, labels, groups = [], [], []
    for p in range(n):
        tint = rng.uniform(60, 200, 3)
        grain = rng.uniform(5, 30)
        for _ in range(per_patient):  # smooth tissue structure (~16 px), and the patient's fine grain
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8)).resize((128, 96), Image.BICUBIC)
            field = (np.asarray(coarse, dtype=float)[..., None] - 128) * 0.6 + rng.normal(0, grain, (96, 128, 3))
            images.append(np.clip(tint + field, 0, 255).astype(np.uint8))
            labels.append("AB"[p % 2])
            groups.append(f"patient{p}")
    return images, labels, groups


def test_patient_folds_are_clean_and_per_image_folds_of_the_same_images_leaky() -> None:
    images, labels, groups = patients()
    descriptors = np.stack([describe(im) for im in images])
    names = [f"{g}-{i}.png" for i, g in enumerate(groups)]
    by_patient, _ = assign_folds(labels, groups, SplitConfig(k=3, val_fraction=0))
    per_image, _ = assign_folds(labels, names, SplitConfig(k=3, val_fraction=0))
    clean, leaky = audit(descriptors, by_patient, names), audit(descriptors, per_image, names)
    assert clean.verdict == "clean" and leaky.verdict == "leaky"
    assert leaky.cross_fold_neighbour_share > 2 * clean.cross_fold_neighbour_share
    assert not clean.near_duplicates and leaky.suspicious  # look-alike pairs across folds are named
    assert all(s["image"].split("-")[0] == s["nearest_in_other_fold"].split("-")[0] for s in leaky.suspicious[:5])


def test_planted_near_duplicates_across_folds_are_named(tmp_path: Path) -> None:
    images, labels, groups = patients()
    names = [f"{g}-{i}.png" for i, g in enumerate(groups)]
    folds, _ = assign_folds(labels, groups, SplitConfig(k=3, val_fraction=0))
    for name, image in zip(names, images):
        Image.fromarray(image).save(tmp_path / name)
    # 7: the same bytes under another name; 23: re-cropped by 3 px, resized and saved as JPEG. Both filed in
    # another fold, as a copy under another patient would be
    (tmp_path / "exact-copy.png").write_bytes((tmp_path / names[7]).read_bytes())
    Image.fromarray(images[23][3:, 3:]).resize((120, 90)).save(tmp_path / "recropped.jpg", quality=80)
    for copy, source in (("exact-copy.png", 7), ("recropped.jpg", 23)):
        names.append(copy)
        folds.append(next(f for f in sorted(set(folds)) if f != folds[source]))
    result = audit(np.stack([describe(read_rgb(tmp_path / n)[0]) for n in names]), folds, names)
    assert result.verdict == "leaky"
    assert sorted(sorted((d["image"], d["other"])) for d in result.near_duplicates) == sorted(
        [sorted((names[7], "exact-copy.png")), sorted((names[23], "recropped.jpg"))])


def test_the_report_names_pairs_and_draws_a_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for c in ("A", "B"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            tint = rng.uniform(60, 200, 3)
            Image.fromarray(np.clip(tint + rng.normal(0, 30, (48, 64, 3)), 0, 255).astype(np.uint8)).save(
                root / c / f"{c}-{i}.png")
    data = {"name": "t", "root": str(root), "split": {"k": 2, "val_fraction": 0},
            "patches": {"size": 36, "stride": 32, "rotations": [0]},
            "shards": {"dir": str(tmp_path / "p"), "workers": 1}}
    prepared = prepare_dataset(data, quiet=True)
    assert (prepared.path / "audit.md").is_file() and (prepared.path / "descriptors.npy").is_file()
    result, report = audit_prepared(prepared.path, tmp_path / "out")
    assert report.read_text().startswith("# Leak audit") and result.verdict in report.read_text()
    png = (tmp_path / "out" / "audit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (tmp_path / "out" / "audit.json").is_file()


def test_real_lymphoma_per_image_and_block_folds_are_leaky_case_folds_clean(lymphoma_dir: Path) -> None:
    rows = list(csv.DictReader(open(lymphoma_dir / "cases.csv")))
    images = [read_rgb(lymphoma_dir / r["image"])[0] for r in rows]
    descriptors = np.stack([describe(im) for im in images])
    labels, names = [r["label"] for r in rows], [r["image"] for r in rows]
    index = [int(re.search(r"-(\d+)\.", r["image"]).group(1)) for r in rows]
    blocks = [f"{r['label']}/{i // 8}" for r, i in zip(rows, index)]
    verdicts = {}
    for protocol, groups in (("images", names), ("blocks", blocks), ("cases", [r["group"] for r in rows])):
        folds, _ = assign_folds(labels, groups, SplitConfig(k=5, val_fraction=0))
        verdicts[protocol] = audit(descriptors, folds, names)
    assert verdicts["images"].verdict == verdicts["blocks"].verdict == "leaky"
    assert verdicts["cases"].verdict == "clean" and not verdicts["cases"].near_duplicates
    assert verdicts["cases"].ratio < 0.5 * verdicts["blocks"].ratio < verdicts["images"].ratio

    # ten images re-cropped by 3 px and saved as JPEG, and the same ten also resized to 0.9 (quality 70), each copy
    # in a fold its source is not in: all plain re-crops are named (all 282 are, checked once), at least nine of the
    # resized ones (275 of 282), and no pair of distinct images
    folds, _ = assign_folds(labels, [r["group"] for r in rows], SplitConfig(k=5, val_fraction=0))
    sources = list(range(0, len(rows), len(rows) // 10))[:10]
    copies, copy_names, copy_folds = [], [], []
    for kind, scale, quality in (("recrop", 1.0, 80), ("resized", 0.9, 70)):
        for s in sources:
            copy = Image.fromarray(images[s][3:, 3:])
            buffer = io.BytesIO()
            copy.resize((int(copy.width * scale), int(copy.height * scale))).save(buffer, "JPEG", quality=quality)
            copies.append(describe(np.asarray(Image.open(buffer).convert("RGB"))))
            copy_names.append(f"{kind}-of-{s}")
            copy_folds.append(next(f for f in "12345" if f != folds[s]))
    planted = audit(np.vstack([descriptors, copies]), folds + copy_folds, names + copy_names)
    pairs = {frozenset((d["image"], d["other"])) for d in planted.near_duplicates}
    found = {kind: sum(frozenset((names[s], f"{kind}-of-{s}")) in pairs for s in sources)
             for kind in ("recrop", "resized")}
    assert found["recrop"] == 10 and found["resized"] >= 9, found
    assert pairs <= {frozenset((names[s], f"{kind}-of-{s}")) for kind in ("recrop", "resized") for s in sources}


def test_neighbours_come_from_a_tree_not_all_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every search is a k-d tree in a few principal components (a tree slows quickly with more dimensions), and on
    unstructured descriptors the cross-fold share is about chance."""
    dims = []

    class Recording(cKDTree):
        def __init__(self, data, *args, **kwargs):
            dims.append(np.shape(data)[1])
            super().__init__(data, *args, **kwargs)

    monkeypatch.setattr(audit_module, "cKDTree", Recording)
    rng = np.random.default_rng(0)
    n = 2000
    result = audit(rng.normal(size=(n, 17 + 256)).astype(np.float32), [str(i % 5) for i in range(n)],
                   [str(i) for i in range(n)])
    assert dims and all(d <= audit_module.SEARCH_DIMS for d in dims)
    assert result.images == n and 0.6 < result.ratio < 1.4 and not result.near_duplicates
