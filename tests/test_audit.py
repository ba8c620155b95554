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

from histoflow.audit import audit, audit_prepared, describe
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


def test_a_planted_near_duplicate_across_folds_is_named(tmp_path: Path) -> None:
    images, labels, groups = patients()
    names = [f"{g}-{i}.png" for i, g in enumerate(groups)]
    folds, _ = assign_folds(labels, groups, SplitConfig(k=3, val_fraction=0))
    source = 7  # re-cropped by 3 px, resized and re-encoded as JPEG, then filed under another patient and fold
    copy = Image.fromarray(images[source][3:, 3:]).resize((120, 90))
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=80)
    buffer.seek(0)
    images.append(np.asarray(Image.open(buffer).convert("RGB")))
    names.append("planted-copy.jpg")
    folds.append(next(f for f in sorted(set(folds)) if f != folds[source]))
    result = audit(np.stack([describe(im) for im in images]), folds, names)
    assert result.verdict == "leaky"
    assert [{d["image"], d["other"]} for d in result.near_duplicates] == [{names[source], "planted-copy.jpg"}]


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
            "patches": {"size": 36, "stride": 32, "rotations": [0]}, "shards": {"dir": str(tmp_path / "p"), "workers": 1}}
    prepared = prepare_dataset(data, quiet=True)
    assert (prepared.path / "audit.md").is_file() and (prepared.path / "descriptors.npy").is_file()
    result, report = audit_prepared(prepared.path, tmp_path / "out")
    assert report.read_text().startswith("# Leak audit") and result.verdict in report.read_text()
    png = (tmp_path / "out" / "audit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (tmp_path / "out" / "audit.json").is_file()


def test_real_lymphoma_per_image_and_block_folds_are_leaky_case_folds_clean(lymphoma_dir: Path) -> None:
    rows = list(csv.DictReader(open(lymphoma_dir / "cases.csv")))
    descriptors = np.stack([describe(read_rgb(lymphoma_dir / r["image"])[0]) for r in rows])
    labels, names = [r["label"] for r in rows], [r["image"] for r in rows]
    index = [int(re.search(r"-(\d+)\.", r["image"]).group(1)) for r in rows]
    blocks = [f"{r['label']}/{i // 8}" for r, i in zip(rows, index)]
    verdicts = {}
    for protocol, groups in (("images", names), ("blocks", blocks), ("cases", [r["group"] for r in rows])):
        folds, _ = assign_folds(labels, groups, SplitConfig(k=5, val_fraction=0))
        verdicts[protocol] = audit(descriptors, folds, names)
    assert verdicts["images"].verdict == verdicts["blocks"].verdict == "leaky"
    assert verdicts["cases"].verdict == "clean"
    assert verdicts["cases"].ratio < 0.5 * verdicts["blocks"].ratio < verdicts["images"].ratio


@pytest.mark.parametrize("n", [2000])
def test_the_search_is_not_all_pairs(n: int) -> None:
    """Neighbours come from a tree in a few principal components: the result holds k rows per image."""
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(n, 17 + 256)).astype(np.float32)
    result = audit(descriptors, [str(i % 5) for i in range(n)], [str(i) for i in range(n)])
    assert result.images == n and 0.6 < result.ratio < 1.4  # no structure: about chance
