"""Patients at `prepare` (data.groups): a table saved by Excel, an image under two patients, a patient of two
classes, rows for absent files, an image copied under another patient, the leak audit and small folds with
patients given."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CLASSES, config, make_images

from histoflow.common.errors import ConfigError
from histoflow.data.prepare import prepare_dataset
from histoflow.data.sources import SourceConfig, list_images


def _groups_table(root: Path, rows: list[list[str]], bom: bool = False) -> str:
    with (root / "patients.csv").open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write("image,group\n" + "".join(",".join(row) + "\n" for row in rows))
    return "patients.csv"



def _every_image(root: Path) -> list[list[str]]:
    """Each image its patient: <class>-<index // 2> (two images a patient, one class each)."""
    return [[f"{p.parent.name}/{p.name}", f"{p.parent.name}-{int(p.stem.rsplit('-', 1)[1]) // 2}"]
            for p in sorted(root.glob("*/*.png"))]



def test_a_patient_table_saved_by_excel_reads(tmp_path: Path) -> None:
    """Issue 29.5: Excel's "CSV UTF-8" starts with a byte-order mark, once read as a column '\\ufeffimage'."""
    root = make_images(tmp_path / "images", per_class=4)
    cfg = SourceConfig(classes=CLASSES, groups=_groups_table(root, _every_image(root), bom=True))
    records, problems = list_images(cfg, root)
    assert not problems and {r.group for r in records} == {f"{c}-{i}" for c in CLASSES for i in (0, 1)}



def test_an_image_under_two_patients_is_refused(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    rows = _every_image(root) + [["FL/FL-0.png", "FL-1"]]  # the last row once won in silence
    with pytest.raises(ConfigError, match=r"1 image\(s\) listed under two patients: FL/FL-0.png \('FL-0' and 'FL-1'\)"):
        list_images(SourceConfig(classes=CLASSES, groups=_groups_table(root, rows)), root)



def test_a_patient_of_two_classes_is_refused_where_labels_belong_to_patients(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    together = ("CLL/CLL-0.png", "FL/FL-0.png")
    rows = [[image, "P1" if image in together else group] for image, group in _every_image(root)]
    table = _groups_table(root, rows)
    with pytest.raises(ConfigError, match=r"1 patient\(s\) hold images of two or more classes: P1 \(CLL, FL\)"):
        list_images(SourceConfig(classes=CLASSES, groups=table, patient_labels=True), root)
    records, problems = list_images(SourceConfig(classes=CLASSES, groups=table), root)  # tissue types: allowed
    assert not problems and {r.label for r in records if r.group == "P1"} == {"CLL", "FL"}



def test_table_rows_for_absent_files_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    rows = _every_image(root) + [["MCL/MCL-9.png", "MCL-4"]]
    records, problems = list_images(SourceConfig(classes=CLASSES, groups=_groups_table(root, rows)), root)
    assert len(records) == 12 and not problems
    assert "1 row(s) name files that are not under" in caplog.text and "MCL/MCL-9.png" in caplog.text



def test_an_image_copied_under_another_patient_merges_them_with_a_log_line(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    (root / "CLL" / "CLL-3.png").write_bytes((root / "CLL" / "CLL-0.png").read_bytes())  # patients CLL-0 and CLL-1
    data = config(root, tmp_path / "prepared", groups=_groups_table(root, _every_image(root)))
    prepared = prepare_dataset(data, quiet=True)
    assert "CLL/CLL-0.png (patient CLL-0) and CLL/CLL-3.png (patient CLL-1) are the same image" in caplog.text
    folds = {row["image"]: row["fold"] for row in prepared.manifest()}
    assert folds["CLL/CLL-0.png"] == folds["CLL/CLL-1.png"] == folds["CLL/CLL-2.png"] == folds["CLL/CLL-3.png"]



def test_the_leak_audit_with_groups_given_says_they_do_not_look_like_patients(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29: with patients given, the audit still said "give the patients (data.groups=...)"."""
    root = make_images(tmp_path / "images", per_class=6, size=(96, 80))
    without = prepare_dataset(config(root, tmp_path / "a"), quiet=True)
    assert "leaky" in caplog.text and "give the patients" in caplog.text  # these images look alike across folds
    caplog.clear()
    prepare_dataset(config(root, tmp_path / "b", groups=_groups_table(root, _every_image(root))), quiet=True)
    assert "leaky" in caplog.text and "groups given do not look like patients" in caplog.text
    assert "give the patients" not in caplog.text and without.record["images"] == 18



def test_small_data_warns_once_about_validation_and_about_one_patient_folds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29: five near-identical validation-split warnings; a test fold of a single patient got none."""
    root = make_images(tmp_path / "images", per_class=6)  # 3 classes x 2 patients of 3 images: 6 patients, 5 folds
    rows = [[f"{p.parent.name}/{p.name}", f"{p.parent.name}-{int(p.stem.rsplit('-', 1)[1]) // 3}"]
            for p in sorted(root.glob("*/*.png"))]
    data = config(root, tmp_path / "p", groups=_groups_table(root, rows), split={"k": 5, "val_fraction": 0.5})
    prepared = prepare_dataset(data, quiet=True)
    validation = [r for r in caplog.records if "validation split lacks a class" in r.getMessage()]
    assert len(validation) == 1 and validation[0].getMessage().count("fold ") >= 2
    patients: dict[str, set[str]] = {}
    for row in prepared.manifest():
        patients.setdefault(row["fold"], set()).add(row["group"])
    lone = sorted(fold for fold, held in patients.items() if len(held) == 1)
    assert lone and f"fold(s) {', '.join(lone)} hold a single group (patient) each" in caplog.text
