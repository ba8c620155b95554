"""Slide tables (slide,patient,label[,...]): read and checked, every problem named by row with its fix at once; folds
by patient; `histoflow predict slides=<table.csv>` predicts the slides listed and keeps their columns."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_slide_predict
from omegaconf import OmegaConf
from test_slide_predict import CMU, REPO, TCGA, read_csv

from histoflow.common.errors import MissingInputError
from histoflow.data.folds import SplitConfig
from histoflow.deployment import slide_predict
from histoflow.inference.fold_models import FoldModel
from histoflow.inference.voting import by_votes
from histoflow.slides.table import SlideRecord, SlideTableError, read_slide_table, slide_folds

model = test_slide_predict.model  # a fixture: the tiny net trained one batch on the Kather sample


def write_table(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def touch(folder: Path, *names: str) -> None:
    """Files that only need to exist (the table checks existence, not content)."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def table_error(path: Path) -> str:
    with pytest.raises(SlideTableError) as caught:
        read_slide_table(path)
    return str(caught.value)


def test_a_table_of_real_slides_is_read_with_its_other_columns(wsi_dir: Path, tmp_path: Path) -> None:
    """Paths relative to the table's folder or absolute; Excel's BOM, spaces around cells and blank rows are no
    trouble; the columns beyond slide, patient and label are kept in their order."""
    (tmp_path / "wsi").symlink_to(wsi_dir)
    table = write_table(tmp_path / "cohort.csv",
                        "slide, patient ,label,stage,site\n"
                        f"wsi/{CMU},P1,tumour,II,colon\n"
                        "\n"
                        f" {wsi_dir / TCGA} ,P2,normal,,rectum\n", encoding="utf-8-sig")
    assert table.read_bytes().startswith(b"\xef\xbb\xbf")  # a BOM, as Excel's "CSV UTF-8" writes it
    slides = read_slide_table(table)
    assert slides == [
        SlideRecord(tmp_path / "wsi" / CMU, f"wsi/{CMU}", "P1", "tumour", {"stage": "II", "site": "colon"}),
        SlideRecord(wsi_dir / TCGA, str(wsi_dir / TCGA), "P2", "normal", {"stage": "", "site": "rectum"})]
    assert all(s.path.is_absolute() and s.path.is_file() for s in slides)
    assert slides[0].columns() == {"patient": "P1", "label": "tumour", "stage": "II", "site": "colon"}


def test_a_misspelt_or_missing_column_names_the_fix(tmp_path: Path) -> None:
    touch(tmp_path, "a.svs")
    message = table_error(write_table(tmp_path / "t.csv", "slide,lable,stage\na.svs,tumour,II\n"))
    assert message.startswith(f"{tmp_path / 't.csv'}: 2 problems")
    assert ("row 1: no column 'patient' (required: slide, patient, label; found: 'slide', 'lable', 'stage'). "
            "Fix: add a column 'patient'") in message
    assert "row 1: no column 'label' " in message and "Fix: rename column 'lable' to 'label'" in message
    assert "Fix: rename column 'Patient' to 'patient'" in table_error(
        write_table(tmp_path / "t.csv", "slide,Patient,label\na.svs,P1,tumour\n"))
    assert table_error(write_table(tmp_path / "t.csv", "slide;patient;label\na.svs;P1;tumour\n")) == (
        f"{tmp_path / 't.csv'}: row 1: one column, 'slide;patient;label': the columns are not separated by commas. "
        "Fix: save the table with commas between its columns")
    assert "column 'label' is named 2 times. Fix: give each column its own name" in table_error(
        write_table(tmp_path / "t.csv", "slide,patient,label,label\na.svs,P1,tumour,normal\n"))
    assert "no slides: the table has a header and no rows. Fix: add a row per slide" in table_error(
        write_table(tmp_path / "t.csv", "slide,patient,label\n\n"))


def test_every_row_problem_is_named_at_once_with_its_row_and_fix(tmp_path: Path) -> None:
    """Rows as a spreadsheet numbers them (header 1, blank rows counted): an empty cell, a missing file, the same
    slide twice (once relative, once absolute), a patient with two labels, a value under no column name."""
    touch(tmp_path, "s/a.svs", "s/b.svs", "s/c.svs")
    table = write_table(tmp_path / "t.csv",
                        "slide,patient,label\n"
                        "s/a.svs,P1,tumour\n"               # row 2
                        "s/b.svs,,tumour\n"                 # row 3: no patient
                        "\n"                                # row 4: blank
                        "s/missing.svs,P2,normal\n"         # row 5: no file
                        f"{tmp_path / 's/a.svs'},P3,normal\n"  # row 6: a.svs again
                        "s/c.svs,P1,normal,oops\n")          # row 7: P1's second label; a value without a column
    lines = table_error(table).splitlines()
    assert lines[0] == f"{table}: 5 problems (rows as a spreadsheet numbers them, the header is row 1):"
    assert lines[1:] == [
        "  row 3: patient empty. Fix: fill in every slide's slide, patient, label",
        (f"  row 5: slide 's/missing.svs': no file at {tmp_path / 's/missing.svs'}. Fix: correct the path "
         f"(relative paths start from the table's folder {tmp_path})"),
        "  row 7: a value under no column name ('oops'). Fix: name its column in row 1, or delete the value",
        f"  rows 2 and 6: the same slide {(tmp_path / 's/a.svs').resolve()}. Fix: keep one row per slide",
        ("  patient 'P1' has 2 labels: 'tumour' in row 2; 'normal' in row 7. Fix: give all of a patient's slides "
         "the patient's label, or correct the patient")]


def test_a_table_that_is_not_there_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match=r"nowhere.csv: no slide table there. Fix: check the path"):
        read_slide_table(tmp_path / "nowhere.csv")
    table = write_table(tmp_path / "t.csv", "slide,patient,label\na.svs,Müller,tumour\n", encoding="latin-1")
    assert table_error(table).startswith(f"{table}: not UTF-8 text (") and "Fix: save it as 'CSV UTF-8'" in (
        table_error(table))
    many = write_table(tmp_path / "many.csv",
                       "slide,patient,label\n" + "".join(f"x{i}.svs,P{i},a\n" for i in range(25)))
    message = table_error(many)
    assert message.startswith(f"{many}: 25 problems") and message.endswith("\n  ... and 5 more")


def test_folds_keep_every_patient_on_one_side(tmp_path: Path) -> None:
    """30 patients of 1 to 3 slides, two labels: 3 stratified folds, and each patient's slides share a fold and a
    validation flag, so no split has a patient on both sides."""
    rows = [(f"P{p}/s{s}.svs", f"P{p}", "tumour" if p % 2 else "normal") for p in range(30) for s in range(1 + p % 3)]
    touch(tmp_path, *(r[0] for r in rows))
    table = write_table(tmp_path / "t.csv", "slide,patient,label\n" + "".join(",".join(r) + "\n" for r in rows))
    slides = read_slide_table(table)
    for cfg in (SplitConfig(k=3, val_fraction=0.2), SplitConfig(kind="fractions")):
        folds, val = slide_folds(slides, cfg)
        sides: dict[str, set[tuple[str, bool]]] = {}
        for s, f, v in zip(slides, folds, val):
            sides.setdefault(s.patient, set()).add((f, v))
        assert len(sides) == 30 and all(len(places) == 1 for places in sides.values())
        for fold in set(folds):  # stratified: both labels in every fold
            assert {s.label for s, f in zip(slides, folds) if f == fold} == {"tumour", "normal"}
        assert any(val) and not all(val)
    assert slide_folds(slides, SplitConfig(k=3)) == slide_folds(slides, SplitConfig(k=3))  # seeded


def test_predict_a_slide_table_from_the_command_line(model: FoldModel, wsi_dir: Path,
                                                     tmp_path: Path) -> None:
    """`predict slides=<table.csv>`: the slide listed is predicted and slides.csv carries its patient, label and
    other columns; one named like slides.csv's own (`tiles`) is kept as table_tiles, said in the log."""
    (tmp_path / "wsi").symlink_to(wsi_dir)
    table = write_table(tmp_path / "cohort.csv", f"slide,patient,label,stage,tiles\nwsi/{CMU},P1,01_TUMOR,II,9999\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), f"ckpt_path={model.path}", f"slides={table}",
         "slide.tile_size=256", "slide.thumbnail_size=512", "slide.num_workers=0", "progress=false",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv(tmp_path / "run" / "slides.csv")
    assert list(rows[0])[:12] == ["slide", "output", "patient", "label", "stage", "table_tiles", "predicted",
                                  "correct", "confidence", "vote_margin", "tiles", "tiles_per_s"]
    assert [(r["slide"], r["patient"], r["label"], r["stage"], r["table_tiles"]) for r in rows] == [
        (str(tmp_path / "wsi" / CMU), "P1", "01_TUMOR", "II", "9999")]
    assert 0 < int(rows[0]["tiles"]) < 9999 and Path(rows[0]["heatmap"]).is_file()  # the tiles predicted
    assert "column tiles named like slides.csv's own: written there as table_tiles" in done.stderr + done.stdout


def test_a_labelled_table_gets_a_verdict_per_slide_and_labels_outside_the_classes_are_named(
        model: FoldModel, wsi_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`predict slides=<table with labels>`: each slide's class by the image rule (`aggregate`) over its tiles, and
    `correct` where its label is one of the model's classes; a label outside them is named once, before any slide
    is read, and its slide gets no verdict. Two copies of one slide under one file name: `output` names each one's
    files (the first keeps the name, the second gets -2)."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(wsi_dir / CMU, tmp_path / folder / CMU)
    table = write_table(tmp_path / "cohort.csv", f"slide,patient,label\na/{CMU},P1,{model.classes[0]}\n"
                                                 f"b/{CMU},P2,tumour\n")
    cfg = OmegaConf.create({"slides": str(table), "aggregate": "vote", "on_bad_image": "error",
                            "slide": {"tile_size": 256, "thumbnail_size": 512, "num_workers": 0, "progress": False}})
    with caplog.at_level(logging.WARNING, logger="histoflow.deployment.slide_predict"):
        slide_predict.predict_slides(cfg, [[model]], None, tmp_path / "run", {})
    said = [r.getMessage() for r in caplog.records if "not among the model's classes" in r.getMessage()]
    assert len(said) == 1 and "'tumour' (1 slides)" in said[0] and model.classes[0] not in said[0].split("(")[0]
    rows = read_csv(tmp_path / "run" / "slides.csv")
    stem = Path(CMU).stem
    assert [(r["output"], Path(r["map"]).name) for r in rows] == [(stem, f"{stem}.map.npy"),
                                                                  (f"{stem}-2", f"{stem}-2.map.npy")]
    for row in rows:
        meta = json.loads((tmp_path / "run" / "slides" / f"{row['output']}.json").read_text())
        votes = np.array([meta["predicted_tiles"][c] for c in model.classes])
        probs = np.array([meta["mean_probability"][c] for c in model.classes])
        assert [int(row[f"votes_{c}"]) for c in model.classes] == votes.tolist()
        assert row["predicted"] == model.classes[int(by_votes(votes[None], probs[None])[0])]  # the image rule
    assert rows[0]["correct"] == str(rows[0]["predicted"] == model.classes[0]) and rows[1]["correct"] == ""


def test_a_table_of_one_class_is_refused_before_any_work(tmp_path: Path) -> None:
    """Issue 37, item 11: a table of one class gave a torchmetrics traceback after embedding every slide."""
    from histoflow.features.slide_bags import SlideBagDataModule

    touch(tmp_path, "a.svs", "b.svs")
    table = write_table(tmp_path / "one.csv", "slide,patient,label\na.svs,P1,tumour\nb.svs,P2,tumour\n")
    with pytest.raises(SlideTableError, match=r"one.csv: one class, 'tumour', in all 2 slides: a classifier needs "
                                              r"at least two. Fix: add slides of another class"):
        SlideBagDataModule(table=str(table), embed=object(), features={"out": str(tmp_path / "features")})
    assert not (tmp_path / "features").exists()


def test_capitalised_headers_give_one_hint(tmp_path: Path) -> None:
    """Issue 37, item 17: `Slide,Patient,Label` gave three errors, one per column."""
    touch(tmp_path, "a.svs")
    error = table_error(write_table(tmp_path / "t.csv", "Slide,Patient,Label\na.svs,P1,x\n"))
    assert error.endswith("row 1: column names are lower case: found 'Slide', 'Patient', 'Label'. Fix: rename them "
                          "slide, patient, label")


def test_a_windows_path_gets_a_hint(tmp_path: Path) -> None:
    touch(tmp_path, "scans/a.svs")
    error = table_error(write_table(tmp_path / "t.csv", "slide,patient,label\nscans\\a.svs,P1,x\n"))
    assert "a Windows path: write it with '/' between folders, 'scans/a.svs'" in error


def test_too_few_patients_for_the_folds_say_patients_and_slides(tmp_path: Path) -> None:
    touch(tmp_path, *(f"s{i}.svs" for i in range(6)))
    rows = "".join(f"s{i}.svs,P{i // 2},{'aba'[i // 2]}\n" for i in range(6))
    records = read_slide_table(write_table(tmp_path / "t.csv", "slide,patient,label\n" + rows))
    with pytest.raises(Exception, match=r"data.split.k: 3 patients cannot fill 5 folds. Fix: add slides of more "
                                        r"patients"):
        slide_folds(records, SplitConfig(k=5))


def test_a_table_of_slides_with_a_target_needs_no_label(tmp_path: Path) -> None:
    """task=survival|regression (and embedding) read the table with labelled=False: the label column may be left
    out, or empty, and the target's columns are kept; a classifier's read still requires it, naming the column."""
    touch(tmp_path, "a.svs", "b.svs", "c.svs")
    table = write_table(tmp_path / "survival.csv", "slide,patient,time,event\na.svs,P1,3.5,1\nb.svs,P1,3.5,1\n"
                                                   "c.svs,P2,7,0\n")
    slides = read_slide_table(table, labelled=False)
    assert [(s.patient, s.label, s.extra) for s in slides] == [
        ("P1", "unlabelled", {"time": "3.5", "event": "1"}), ("P1", "unlabelled", {"time": "3.5", "event": "1"}),
        ("P2", "unlabelled", {"time": "7", "event": "0"})]
    assert "row 1: no column 'label' (required: slide, patient, label" in table_error(table)
    with_empty = write_table(tmp_path / "empty.csv", "slide,patient,label,time,event\na.svs,P1,,3.5,1\n"
                                                     "c.svs,P2,FL,7,0\n")
    assert [s.label for s in read_slide_table(with_empty, labelled=False)] == ["unlabelled", "FL"]
    assert "row 2: label empty" in table_error(with_empty)
    no_patient = write_table(tmp_path / "no_patient.csv", "slide,time,event\na.svs,3.5,1\n")
    with pytest.raises(SlideTableError, match=r"no column 'patient' \(required: slide, patient; found"):
        read_slide_table(no_patient, labelled=False)
