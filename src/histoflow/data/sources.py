"""Where images come from: a folder of class folders, file-name prefixes, a CSV, or an archive URL.

A source yields one record per image: its path relative to the root, its class label and its group
(the patient or slide; by default each image is its own group, as in the lymphoma tutorial).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.data.download import fetch_archive
from histoflow.data.images import IMAGE_SUFFIXES
from histoflow.data.problems import Problem

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """The part of a data config that says which images there are and what their labels are."""

    root: str | None = None  # local folder; when absent and `url` is set, the archive is fetched
    url: str | None = None  # archive (.tar.gz/.zip) with the same layout
    mirrors: list[str] = field(default_factory=list)
    checksum: str | None = None  # "sha1:<hex>" or "sha256:<hex>"
    subdir: str | None = None  # folder inside the unpacked archive that holds the classes
    classes: list[str] | None = None  # None: the class folders (or labels) found, sorted
    labels: str = "folder"  # folder | prefix | csv
    label_regex: str = r"^([A-Za-z]+)"  # labels=prefix: first capture group of the file name
    csv: str | None = None  # labels=csv: columns image,label[,group]; paths relative to root
    group_regex: str | None = None  # first capture group of the file name names the patient/slide
    group_block: int | None = None  # with group_regex: group = captured number // block (contiguous blocks)
    groups: str | None = None  # a table image,group[,label] (paths relative to root): the patient of every image
    patient_labels: bool = False  # true: a label belongs to the patient (a diagnosis), so one group holding two
    # classes is an error; false: a patient's images may hold several classes (tissue types of one slide)


@dataclass(frozen=True)
class ImageRecord:
    """One image of the source: path relative to the root, class label and group."""

    path: str
    label: str
    group: str


def resolve_root(cfg: SourceConfig, cache_dir: str | Path) -> Path:
    """The local folder holding the images; only when data.root is not set, the archive at data.url, fetched and
    unpacked once."""
    if cfg.root:
        root = Path(cfg.root).expanduser()
        if root.is_dir():
            return root.resolve()
        what = "is a file, not a folder" if root.exists() else "no such folder"
        raise MissingInputError(f"data.root={cfg.root}: {what}. Fix: pass data.root=<folder of class folders> "
                                "(predict.py: +data.root=..., its data section starts empty; check the spelling), "
                                "or data.root=null to download data.url")
    if cfg.url:
        unpacked = fetch_archive([cfg.url, *cfg.mirrors], cfg.checksum, Path(cache_dir).expanduser())
        return unpacked / cfg.subdir if cfg.subdir else unpacked
    raise MissingInputError("data.root is not set and there is no data.url. Fix: pass data.root=<folder of class "
                            "folders>, or set data.url to an archive to download")


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder`, sorted, following linked folders (each real folder once, so a link loop ends);
    hidden files and folders are left out."""
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            log.warning("%s: a link back to a folder already listed, left out", top)
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(top) / f for f in files if not f.startswith(".") and os.path.isfile(os.path.join(top, f))]
    return sorted(found)


def _is_listed(path: Path) -> bool:
    return not any(part.startswith(".") for part in path.parts)


def _group(name: str, label: str, cfg: SourceConfig) -> str | None:
    """The group of an image from its file name; None when the regex does not match."""
    if not cfg.group_regex:
        return None
    m = re.search(cfg.group_regex, name)
    if not m:
        return None
    key = m.group(1) if m.groups() else m.group(0)
    if cfg.group_block:
        key = str(int(key) // cfg.group_block)
    return f"{label}/{key}" if cfg.group_block else key


def _table_path(name: str, root: Path) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path


def read_groups(cfg: SourceConfig, root: Path) -> dict[str, tuple[str, str | None]]:
    """image (relative to root) -> (group, label or None) from the data.groups table."""
    table = _table_path(cfg.groups or "", root)
    if not table.is_file():
        raise MissingInputError(f"data.groups={cfg.groups}: no table at {table}. Fix: point data.groups at a CSV "
                                "with columns image,group[,label] (paths relative to data.root), or choose another "
                                "protocol (protocol=images: every image its own patient)")
    with open(table, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(f)
        if not {"image", "group"} <= set(reader.fieldnames or ()):
            raise ConfigError(f"{table}: columns {reader.fieldnames}; expected image,group[,label]")
        rows = [(Path(row["image"]).as_posix(), row["group"], row.get("label") or None) for row in reader]
    groups: dict[str, tuple[str, str | None]] = {}
    twice = []
    for image, group, label in rows:
        if image in groups and groups[image][0] != group:
            twice.append(f"{image} ({groups[image][0]!r} and {group!r})")
        groups.setdefault(image, (group, label))
    if twice:
        raise ConfigError(f"{table}: {len(twice)} image(s) listed under two patients: {'; '.join(twice[:5])}"
                          f"{'; ...' if len(twice) > 5 else ''}. Fix: give each image one row, with its own patient")
    absent = [image for image in groups if not (root / image).is_file()]
    if absent:
        log.warning("%s: %d row(s) name files that are not under %s (left out): %s%s", table, len(absent), root,
                    ", ".join(absent[:5]), ", ..." if len(absent) > 5 else "")
    return groups


def _apply_groups(records: list[ImageRecord], cfg: SourceConfig, root: Path) -> tuple[list[ImageRecord], list[Problem]]:
    """Each image's group from the data.groups table; a label there must agree with the image's label."""
    table, where = read_groups(cfg, root), _table_path(cfg.groups or "", root)
    kept, problems = [], []
    for r in records:
        group, label = table.get(r.path, (None, None))
        if group is None:
            problems.append(Problem(str(root / r.path), "no-group", f"not listed in {where}"))
        elif label is not None and label != r.label:
            problems.append(Problem(str(root / r.path), "conflicting-labels",
                                    f"{where} says {label!r}, data.labels={cfg.labels} says {r.label!r}"))
        else:
            kept.append(ImageRecord(r.path, r.label, group))
    return kept, problems


def _refuse_patients_of_two_classes(records: list[ImageRecord], cfg: SourceConfig) -> None:
    """With data.patient_labels, every group's images share one class: a patient has one diagnosis."""
    classes: dict[str, set[str]] = {}
    for r in records:
        classes.setdefault(r.group, set()).add(r.label)
    mixed = [f"{group} ({', '.join(sorted(labels))})" for group, labels in classes.items() if len(labels) > 1]
    if mixed:
        where = f"data.groups={cfg.groups}" if cfg.groups else "the groups"
        raise ConfigError(f"{where}: {len(mixed)} patient(s) hold images of two or more classes: {'; '.join(mixed[:5])}"
                          f"{'; ...' if len(mixed) > 5 else ''}; with data.patient_labels=true a label belongs to the "
                          "patient. Fix: correct the groups or the labels, or set data.patient_labels=false where a "
                          "patient's images may show several classes (tissue types of one slide)")


def list_images(cfg: SourceConfig, root: Path) -> tuple[list[ImageRecord], list[Problem]]:
    """List the images under root with labels and groups, and every problem found in the listing."""
    problems: list[Problem] = []
    found: list[tuple[Path, str, str | None]] = []  # path, label, explicit group
    if cfg.labels == "folder":
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _is_listed(d.relative_to(root)))
        for d in class_dirs:
            files = files_under(d)
            if (not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files)
                    and (not cfg.classes or d.name in cfg.classes)):
                # a folder data.classes leaves out is not a class of this data set (the fix the problem suggests)
                problems.append(Problem(str(d), "empty-class", "no image files in this class folder"))
            found += [(p, d.name, None) for p in files]
        loose = sorted(p for p in root.iterdir() if p.is_file() and _is_listed(p.relative_to(root)))
        problems += [Problem(str(p), "unknown-class", "file outside any class folder") for p in loose
                     if p.suffix.lower() in IMAGE_SUFFIXES]
    elif cfg.labels == "prefix":
        for p in files_under(root):
            m = re.search(cfg.label_regex, p.name)
            if m is None and p.suffix.lower() in IMAGE_SUFFIXES:
                problems.append(Problem(str(p), "no-label", f"name does not match label_regex {cfg.label_regex!r}"))
            elif m is not None:
                found.append((p, m.group(1) if m.groups() else m.group(0), None))
            else:
                found.append((p, "", None))
    elif cfg.labels == "csv":
        table = Path(cfg.csv or "")
        table = table if table.is_absolute() else root / table
        if not table.is_file():
            raise MissingInputError(f"{table}: label CSV not found. Fix: set data.csv to a file with "
                                    "columns image,label[,group] (paths relative to data.root)")
        with open(table, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                p = root / row["image"]
                if not p.is_file():
                    problems.append(Problem(str(p), "missing", f"listed in {table}"))
                    continue
                found.append((p, row["label"], row.get("group") or None))
    else:
        raise ConfigError(f"data.labels={cfg.labels!r}: expected folder, prefix or csv")

    classes = set(cfg.classes) if cfg.classes else None
    records = []
    for path, label, group in found:
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(Problem(str(path), "not-an-image", f"extension {path.suffix or '(none)'} is not one of "
                                    f"{', '.join(IMAGE_SUFFIXES)}"))
        elif classes is not None and label not in classes:
            problems.append(Problem(str(path), "unknown-class", f"class {label!r} is not in data.classes"))
        elif group is None and cfg.group_regex and _group(path.name, label, cfg) is None:
            problems.append(Problem(str(path), "no-group", f"name does not match group_regex {cfg.group_regex!r}"))
        else:
            group = group or _group(path.name, label, cfg) or rel
            records.append(ImageRecord(rel, label, group))
    if cfg.groups:
        records, unmatched = _apply_groups(records, cfg, root)
        problems += unmatched
    if cfg.patient_labels:
        _refuse_patients_of_two_classes(records, cfg)
    if classes is not None:
        present = {r.label for r in records}
        problems += [Problem(f"{root}/{c}", "empty-class", "listed in data.classes but no images found")
                     for c in sorted(classes - present) if cfg.labels != "folder" or not (root / c).is_dir()]
    return records, problems


def class_names(cfg: SourceConfig, records: list[ImageRecord]) -> list[str]:
    """The class list: as configured, else the labels found, sorted."""
    return list(cfg.classes) if cfg.classes else sorted({r.label for r in records})
