"""Slide tables: a cohort of whole slides named in a CSV with the columns `slide,patient,label` (more columns are
kept), slide paths relative to the CSV's folder, checked on read; and the slides' folds, drawn by patient.

    slide,patient,label,stage
    scans/p1-a.svs,P1,tumour,II
    scans/p1-b.svs,P1,tumour,II
    /archive/p2.ndpi,P2,normal,

A table of slides with a survival or regression target (task=survival|regression), or one read for its features
only (`histoflow embed`), needs no label: the column may be left out or empty (the slide's label is then
`unlabelled`).

Every problem of a table is reported at once, row by row as a spreadsheet numbers them (the header is row 1).
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Mapping, NoReturn, Sequence

from histoflow.common.errors import HistoflowError, MissingInputError
from histoflow.data.folds import SplitConfig, assign_folds

log = logging.getLogger(__name__)
REQUIRED = ("slide", "patient", "label")
UNLABELLED = "unlabelled"  # the label of a slide in a table read with labelled=False that gives it none
MPP = "mpp"  # an optional column: a slide's microns per pixel at level 0, where its file gives none or a wrong one
SHOWN = 20  # problems listed in the error; the rest are counted


class SlideTableError(HistoflowError, ValueError):
    """A slide table that cannot be used; the message names the CSV, each row at fault and the fix."""


@dataclass(frozen=True)
class SlideRecord:
    """One row of a slide table."""

    path: Path  # the slide file, absolute
    slide: str  # the slide as the table writes it
    patient: str
    label: str
    extra: dict[str, str] = field(default_factory=dict, hash=False)  # the table's other columns, in order
    mpp: float | None = None  # the `mpp` column: this slide's microns per pixel, over its file's and slide.source_mpp

    def columns(self) -> dict[str, str]:
        """patient, label and the other columns: what an output table says of the slide."""
        return {"patient": self.patient, "label": self.label, **self.extra}


def _header_problems(header: list[str], required: Sequence[str] = REQUIRED) -> list[str]:
    """Required columns that are missing (with the closest name found: a likely typo), names given twice, a table
    separated by something other than commas."""
    if len(header) == 1 and any(sep in header[0] for sep in ";\t"):
        return [(f"row 1: one column, {header[0]!r}: the columns are not separated by commas. Fix: save the "
                 "table with commas between its columns")]
    cased = {name: h for name in required for h in header if h != name and h.lower() == name}
    if len(cased) > 1 and all(name in header or name in cased for name in required):  # Slide,Patient,Label
        return [(f"row 1: column names are lower case: found {', '.join(repr(h) for h in cased.values())}. Fix: "
                 f"rename them {', '.join(cased)}")]
    problems = []
    others = [name for name in header if name not in REQUIRED]
    for name in required:
        if name not in header:
            close = difflib.get_close_matches(name, others, n=1, cutoff=0.6)
            fix = f"rename column {close[0]!r} to {name!r}" if close else f"add a column {name!r}"
            found = ", ".join(repr(h) for h in header) or "nothing"
            problems.append(f"row 1: no column {name!r} (required: {', '.join(required)}; found: {found}). "
                            f"Fix: {fix}")
    for name in dict.fromkeys(h for h in header if h and header.count(h) > 1):
        problems.append(f"row 1: column {name!r} is named {header.count(name)} times. Fix: give each column its "
                        "own name")
    return problems


def _read(table: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The column names, and (spreadsheet row, cells) of every row below them that is not empty; cells stripped
    and as many as the names at least."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = [[cell.strip() for cell in cells] for cells in csv.reader(handle)]
    except UnicodeDecodeError as e:
        raise SlideTableError(f"{table}: not UTF-8 text ({e}). Fix: save it as 'CSV UTF-8'") from e
    header = rows[0] if rows else []
    return header, [(number, cells + [""] * (len(header) - len(cells)))
                    for number, cells in enumerate(rows[1:], start=2) if any(cells)]


def _mpp(cell: str) -> tuple[float | None, str]:
    """A cell of the `mpp` column as microns per pixel (empty: None), or the problem with it."""
    if not cell:
        return None, ""
    try:
        mpp = float(cell)
    except ValueError:
        mpp = float("nan")
    if not 0 < mpp < 100:
        return None, (f"mpp {cell!r} is not microns per pixel. Fix: the scan's resolution at level 0, e.g. 0.25 "
                      "(40x) or 0.5 (20x), or leave it empty to use the file's")
    return mpp, ""


def _joined(numbers: Sequence[int]) -> str:
    return ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}" if len(numbers) > 1 else str(numbers[0])


def read_slide_table(path: str | Path, labelled: bool = True) -> list[SlideRecord]:
    """The slides a CSV `slide,patient,label[,...]` lists, in its order; SlideTableError lists every problem.
    labelled=False (a survival or regression target; features only): the label column may be absent or empty."""
    required = REQUIRED if labelled else tuple(n for n in REQUIRED if n != "label")
    table = Path(path).expanduser()
    if not table.is_file():
        raise MissingInputError(f"{path}: no slide table there. Fix: check the path (relative paths start from "
                                f"{Path.cwd()})")
    header, rows = _read(table)
    problems = _header_problems(header, required)
    if not problems and not rows:
        problems.append("no slides: the table has a header and no rows. Fix: add a row per slide")
    if problems:
        _fail(table, problems)
    folder = Path(os.path.abspath(table)).parent
    records: list[SlideRecord] = []
    by_file: dict[Path, list[int]] = {}
    by_patient: dict[str, dict[str, list[int]]] = {}
    for number, cells in rows:
        values = dict(zip(header, cells))
        unnamed = [cell for name, cell in zip_longest(header, cells, fillvalue="") if cell and not name]
        if unnamed:
            problems.append(f"row {number}: a value under no column name ({unnamed[0]!r}). Fix: name its column "
                            "in row 1, or delete the value")
        empty = [name for name in required if not values[name]]
        if empty:
            problems.append(f"row {number}: {' and '.join(empty)} empty. Fix: fill in every slide's "
                            f"{', '.join(required)}")
            continue
        values["label"] = values.get("label") or UNLABELLED
        by_patient.setdefault(values["patient"], {}).setdefault(values["label"], []).append(number)
        slide = Path(os.path.abspath(folder / Path(values["slide"]).expanduser()))  # an absolute path stays
        if not slide.is_file():
            windows = ("; a Windows path: write it with '/' between folders, "
                       f"{values['slide'].replace(chr(92), '/')!r}" if "\\" in values["slide"] else "")
            problems.append(f"row {number}: slide {values['slide']!r}: no file at {slide}. Fix: correct the path "
                            f"(relative paths start from the table's folder {folder}{windows})")
            continue
        by_file.setdefault(slide.resolve(), []).append(number)
        mpp, problem = _mpp(values.get(MPP, ""))
        if problem:
            problems.append(f"row {number}: {problem}")
            continue
        extra = {name: value for name, value in values.items() if name and name not in (*REQUIRED, MPP)}
        records.append(SlideRecord(slide, values["slide"], values["patient"], values["label"], extra, mpp))
    for file, numbers in by_file.items():
        if len(numbers) > 1:
            problems.append(f"rows {_joined(numbers)}: the same slide {file}. Fix: keep one row per slide")
    for patient, labels in by_patient.items():
        if len(labels) > 1:
            said = "; ".join(f"{label!r} in row{'s' * (len(n) > 1)} {_joined(n)}" for label, n in labels.items())
            problems.append(f"patient {patient!r} has {len(labels)} labels: {said}. Fix: give all of a patient's "
                            "slides the patient's label, or correct the patient")
    if problems:
        _fail(table, problems)
    return records


def _fail(table: Path, problems: list[str]) -> NoReturn:
    """Raise the table's problems as one error: one line, or a list of the first SHOWN and a count of the rest."""
    if len(problems) == 1:
        raise SlideTableError(f"{table}: {problems[0]}")
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    raise SlideTableError(f"{table}: {len(problems)} problems (rows as a spreadsheet numbers them, the header is "
                          "row 1):\n" + "\n".join(f"  {p}" for p in problems[:SHOWN]) + more)


def check_classes(records: Sequence[SlideRecord], table: str | Path) -> list[str]:
    """The table's labels, sorted; SlideTableError where there is one only (a classifier needs two)."""
    labels = sorted({r.label for r in records})
    if len(labels) < 2:
        raise SlideTableError(f"{table}: one class, {labels[0]!r}, in all {len(records)} slides: a classifier needs "
                              "at least two. Fix: add slides of another class (or correct the label column)")
    return labels


def twin_groups(slides: Sequence[SlideRecord], shas: Mapping[str, str], table: str | Path) -> list[str]:
    """Each slide's fold group: its patient, except that patients sharing a slide of identical bytes (`shas`: each
    slide's sha256, as the table writes the slide) are one group, with a warning naming both: a fold must not test
    a slide whose twin it trained on. The same bytes under two labels is a SlideTableError naming both slides."""
    first: dict[str, SlideRecord] = {}
    parent = {s.patient: s.patient for s in slides}

    def root(patient: str) -> str:
        while parent[patient] != patient:
            patient = parent[patient]
        return patient

    clashes = []
    for s in slides:
        sha = shas.get(s.slide)
        twin = first.setdefault(sha, s) if sha else s
        if twin is s:
            continue
        if twin.label != s.label:
            clashes.append(f"slides {twin.slide!r} (label {twin.label!r}) and {s.slide!r} (label {s.label!r}) have "
                           "identical bytes")
        elif root(twin.patient) != root(s.patient):
            log.warning("%s: slides %r (patient %r) and %r (patient %r) have identical bytes: their patients are "
                        "kept in one fold", table, twin.slide, twin.patient, s.slide, s.patient)
            parent[root(s.patient)] = root(twin.patient)
    if clashes:
        _fail(Path(table), [f"{c}: one set of pixels under two labels. Fix: keep the row with the right label, "
                            "delete the other" for c in clashes])
    return [root(s.patient) for s in slides]


def slide_folds(slides: Sequence[SlideRecord], cfg: SplitConfig, shas: Mapping[str, str] | None = None,
                table: str | Path = "the slide table") -> tuple[list[str], list[bool]]:
    """Each slide's fold and validation flag (data.split's folds): stratified by label and drawn by patient, so all
    slides of a patient are on one side of every split; `shas` (each slide's sha256): patients sharing a slide of
    identical bytes drawn as one (twin_groups)."""
    groups = twin_groups(slides, shas, table) if shas else [s.patient for s in slides]
    return assign_folds([s.label for s in slides], groups, cfg, ("patients", "slides"))
