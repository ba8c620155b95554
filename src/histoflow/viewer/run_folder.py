"""What a run wrote, found where it wrote it, for the viewer: nothing is recomputed.

    a prediction's output   <folder>/slides.csv, <folder>/slides/<stem>.{tiles.csv,map.npy,heatmap.png,json}
                            (deployment/slide_map.py, deployment/slide_predict.py)
    a multirun              <folder>/image_report/report.md (+ .json, PNGs) and its held-out slides' attention maps,
                            <folder>/image_report/attention_maps/<stem>.{tiles.csv,map.npy,json}
                            (inference/image_report.py, inference/attention_maps.py)
    a report folder itself  <folder>/report.md (and attention_maps/)
    a bag model's deployment  both: slides.csv, slides/<stem>.* (each tile's probabilities) and attention_maps/
                            (deployment/cohort_predict.py), report.md where the new slides carried labels

A slide's maps are joined by their stem (both writers name outputs with inference.heatmap.output_names). A slide
file that is no longer where the run read it is looked for under `view.slides_root`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histoflow.common.errors import MissingInputError
from histoflow.inference.attention_maps import MAPS
from histoflow.inference.sweep_report import REPORT_DIR
from histoflow.slides.backend import SLIDE_SUFFIXES

EXPECTED = (f"a prediction's output (slides.csv and slides/<stem>.json from `histoflow predict slides=...`), a "
            f"multirun ({REPORT_DIR}/report.md, {REPORT_DIR}/{MAPS}/) or a report folder (report.md)")


@dataclass
class SlideMap:
    """One map over a slide's tile grid: the class probabilities of a prediction, or a bag head's attention."""

    kind: str  # "probabilities" | "attention"
    meta: dict[str, Any]  # the map's .json
    map_path: Path  # float32 (rows, cols, channels), NaN without a tile
    tiles_csv: Path
    channels: list[str]  # class names, or ["attention"]

    @property
    def geometry(self) -> dict[str, Any]:
        return self.meta["geometry"]

    def grid(self) -> np.ndarray:
        return np.load(self.map_path, mmap_mode="r")


@dataclass
class SlideEntry:
    """A slide of the run with its maps and its row of the slides list."""

    name: str  # the outputs' stem: the slide's name in URLs and files
    source: Path  # the slide file as the run recorded it
    maps: list[SlideMap] = field(default_factory=list)
    row: dict[str, str] = field(default_factory=dict)  # patient, label, prediction, probability...
    path: Path | None = None  # where it is now (source, or under slides_root)


@dataclass
class RunFolder:
    root: Path
    report_dir: Path | None
    slides: dict[str, SlideEntry]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MissingInputError(f"{path}: not a readable map description ({e}); was the run finished?") from e


def _prediction_maps(folder: Path, entries: dict[str, SlideEntry]) -> None:
    rows = {}
    if (folder / "slides.csv").is_file():
        with (folder / "slides.csv").open(newline="") as handle:
            # by `output` (the outputs' name: two slides may share a file name); older runs' tables have none
            rows = {r.get("output") or Path(r["slide"]).name: r for r in csv.DictReader(handle)}
    for meta_path in sorted((folder / "slides").glob("*.json")):
        meta = _read_json(meta_path)
        if "files" not in meta or "geometry" not in meta:
            continue
        stem = meta_path.name.removesuffix(".json")
        entry = entries.setdefault(stem, SlideEntry(stem, Path(meta["slide"])))
        entry.maps.append(SlideMap("probabilities", meta, meta_path.parent / meta["files"]["map"],
                                   meta_path.parent / meta["files"]["csv"], list(meta["classes"])))
        mean = meta.get("mean_probability") or {}
        table = rows.get(stem) or rows.get(Path(meta["slide"]).name, {})
        # the slide's class as slides.csv gives it (predict's `aggregate` rule); older runs: the highest mean
        best = table.get("predicted") or (max(mean, key=mean.get) if mean else "")
        entry.row.update({"patient": table.get("patient", ""), "label": table.get("label", ""),
                          "prediction": best, "probability": f"{mean[best]:.3f}" if best in mean else "",
                          "tiles": str(meta.get("tiles", ""))})


def _attention_maps(report: Path, entries: dict[str, SlideEntry]) -> None:
    for meta_path in sorted((report / MAPS).glob("*.json")):
        meta = _read_json(meta_path)
        source = Path(meta.get("source", ""))
        if source.suffix.lower() not in SLIDE_SUFFIXES:  # an image's attention: no slide to zoom into
            continue
        stem = meta_path.name.removesuffix(".json")
        entry = entries.setdefault(stem, SlideEntry(stem, source))
        entry.maps.append(SlideMap("attention", meta, meta_path.with_name(f"{stem}.map.npy"),
                                   meta_path.with_name(f"{stem}.tiles.csv"), ["attention"]))
        entry.row.setdefault("label", meta.get("label", ""))
        entry.row.setdefault("prediction", meta.get("predicted", ""))
        entry.row.update({"fold": str(meta.get("fold", "")), "bag": Path(str(meta.get("bag", ""))).name})


def locate_slides(run: RunFolder, slides_root: str | Path | None) -> None:
    """Each slide's file now: where the run read it, else its name under `slides_root`; MissingInputError naming
    the slides that moved and the fix."""
    missing = []
    for entry in run.slides.values():
        candidates = [entry.source] if entry.source.is_absolute() else [run.root / entry.source, entry.source]
        if slides_root is not None:
            candidates = [Path(slides_root) / entry.source.name, *candidates]
        entry.path = next((p for p in candidates if p.is_file()), None)
        if entry.path is None:
            missing.append(str(entry.source))
    if missing:
        where = f"under view.slides_root={slides_root}" if slides_root is not None else "where the run read them"
        raise MissingInputError(f"{len(missing)} slide(s) of {run.root} are not {where}: {', '.join(missing[:5])}. "
                                "Fix: view.slides_root=<the folder that holds them now>")


def read_run(folder: str | Path, slides_root: str | Path | None = None) -> RunFolder:
    """The run's report and slides with their maps; MissingInputError saying what was expected where nothing is."""
    root = Path(folder)
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such folder. Expected {EXPECTED}")
    report = next((d for d in (root / REPORT_DIR, root) if (d / "report.md").is_file()), None)
    entries: dict[str, SlideEntry] = {}
    _prediction_maps(root, entries)
    if report is not None:
        _attention_maps(report, entries)
    elif (root / MAPS).is_dir():  # a bag model's prediction of new slides without labels: maps, no report
        _attention_maps(root, entries)
    if report is None and not entries:
        raise MissingInputError(f"{root}: not a run's output: no report.md and no slide maps found. "
                                f"Expected {EXPECTED}")
    run = RunFolder(root, report, dict(sorted(entries.items())))
    locate_slides(run, slides_root)
    return run
