"""New slides as maps (`histoflow predict ... slides=<files | slide table>`, patch models): tiled inference over each
slide's tissue (deployment/slide_map.py), per slide a tile CSV, a class map, a heatmap and, asked, QuPath's GeoJSON;
slides.csv with a verdict per slide where a slide table gives labels. A head on slide or patient bags is
deployment/cohort_predict.py's."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from histoflow.common.errors import ConfigError
from histoflow.data.patches import PatchConfig
from histoflow.data.problems import Problem, write_problems
from histoflow.deployment.geojson import write_tiles_geojson
from histoflow.deployment.predict import files_matching
from histoflow.deployment.slide_map import SlideConfig, SlideResult, predict_slide
from histoflow.inference.fold_models import FoldModel
from histoflow.inference.heatmap import output_names
from histoflow.inference.image_report import prediction_rows, write_csv
from histoflow.inference.voting import AGGREGATES
from histoflow.slides.backend import SLIDE_SUFFIXES
from histoflow.slides.slide import DamagedTileError, SlideError, SlideSettingError
from histoflow.slides.table import read_slide_table
from histoflow.slides.tiles import NoTissueError

log = logging.getLogger(__name__)

# slides.csv's own columns (a slide table's go after `output`), then votes_<class> and prob_<class>
SLIDE_COLUMNS = ["slide", "output", "predicted", "correct", "confidence", "vote_margin", "tiles", "tiles_per_s",
                 "damaged_tiles", "map", "heatmap"]


def _damaged_problem(path: Path, result: SlideResult) -> Problem:
    """problems.csv's account of a slide predicted without its damaged stored tiles."""
    listed = "; ".join(str(t) for t in result.damaged[:5]) + ("; ..." if len(result.damaged) > 5 else "")
    return Problem(str(path), "damaged-tiles",
                   f"{len(result.damaged)} damaged stored tile(s) left out: {listed}. The {result.left_out} tissue "
                   f"tiles over them are NaN in {result.map.name} (as without tissue); all are listed in "
                   f"{result.meta.name}. Fix: re-export the slide or copy it again")


def _slide_problem(path: Path, error: SlideError) -> Problem:
    """problems.csv's account of a slide that could not be predicted."""
    kind = ("no-tissue" if isinstance(error, NoTissueError) else
            "damaged-tiles" if isinstance(error, DamagedTileError) else
            "setting" if isinstance(error, SlideSettingError) else "unreadable")
    return Problem(str(path), kind, str(error))


def _slide_files(spec: str | list[str]) -> tuple[list[Path], dict[Path, dict[str, str]], dict[Path, float | None]]:
    """The slide files to predict, and for a slide table (a .csv) what it says of each: patient, label, the rest;
    and its `mpp` column (each slide's microns per pixel, over its file's)."""
    if isinstance(spec, str) and spec.lower().endswith(".csv"):
        table = read_slide_table(spec)
        said = {s.path: s.columns() for s in table}
        clashing = sorted(c for c in next(iter(said.values()), {})
                          if c in SLIDE_COLUMNS or c.startswith(("votes_", "prob_")))
        if clashing:  # a table's column named like one of slides.csv's own is kept, renamed, never overwritten
            log.warning("%s: column%s %s named like slides.csv's own: written there as %s", spec,
                        "s" * (len(clashing) > 1), ", ".join(clashing), ", ".join(f"table_{c}" for c in clashing))
            said = {path: {f"table_{k}" if k in clashing else k: v for k, v in cols.items()}
                    for path, cols in said.items()}
        return [s.path for s in table], said, {s.path: s.mpp for s in table}
    return files_matching(spec, SLIDE_SUFFIXES, key="slides"), {}, {}


def _slide_row(path: Path, name: str, result: SlideResult, said: Mapping[str, str], classes: list[str],
               aggregate: str) -> dict[str, Any]:
    """slides.csv's row of a slide: its table columns, its class by the image rule (`aggregate` over its tiles as
    patches: inference.image_report.prediction_rows) and, where its label is one of the classes, `correct`."""
    verdict = next(iter(prediction_rows(result.as_votes(), classes, aggregate)), {})  # none: every tile damaged
    row = {"slide": str(path), "output": name, **said,
           **{k: v for k, v in verdict.items() if k not in ("image", "patches")}}
    if "label" in said:
        row["correct"] = verdict["predicted"] == said["label"] if verdict and said["label"] in classes else ""
    return row | {"tiles": result.tiles, "tiles_per_s": round(result.tiles_per_s, 1),
                  "damaged_tiles": len(result.damaged), "map": str(result.map), "heatmap": str(result.heatmap)}


def _labels_outside(described: Mapping[Path, Mapping[str, str]], classes: list[str], table: str) -> None:
    """One warning naming a slide table's labels that are not the model's classes: those slides get no verdict."""
    outside = Counter(said["label"] for said in described.values() if said["label"] not in classes)
    if outside:
        log.warning("%s: label%s %s not among the model's classes (%s): %d slide(s) are predicted with no verdict "
                    "(`correct` empty in slides.csv). Fix: correct the label column where it means one of the classes",
                    table, "s" * (len(outside) > 1), ", ".join(f"{label!r} ({n} slides)" for label, n in
                    outside.items()), ", ".join(classes), sum(outside.values()))


def predict_slides(cfg: DictConfig, members: list[list[FoldModel]], grid: PatchConfig, out: Path,
                   settings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Problem], dict[str, Any]]:
    """Whole slides: tiled inference over tissue; per slide a tile CSV, a class map and a heatmap (slides/).

    slides.csv lists the slides predicted, whatever stops the run; a run stopped by something other than a bad
    slide also writes problems.csv, naming the slide it stopped at.
    """
    models = [m for ms in members for m in ms]
    paths, described, mpps = _slide_files(cfg.slides if isinstance(cfg.slides, str) else list(cfg.slides))
    classes = models[0].classes
    aggregate = cfg.get("aggregate", "vote")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate={aggregate!r}: expected one of {list(AGGREGATES)}")
    table = list(next(iter(described.values()), {}))  # a slide table's columns go on into slides.csv, after `output`
    columns = [*SLIDE_COLUMNS[:2], *table, *(c for c in SLIDE_COLUMNS[2:] if c != "correct" or "label" in table),
               *(f"votes_{c}" for c in classes), *(f"prob_{c}" for c in classes)]
    if "label" in table:
        _labels_outside(described, classes, str(cfg.slides))
    slide_cfg = SlideConfig.from_config(OmegaConf.to_container(cfg.slide, resolve=True))
    exports = [slide_cfg.export] if isinstance(slide_cfg.export, str) else list(slide_cfg.export)
    if set(exports) - {"geojson"}:
        raise ConfigError(f"slide.export={slide_cfg.export!r}: expected a list of: geojson")
    names = output_names(paths)
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    try:
        for path in paths:
            try:
                result = predict_slide(path, [(m.net, m.transform) for m in models], classes, slide_cfg,
                                       out / "slides", skip_damaged=cfg.on_bad_image == "skip", name=names[path],
                                       mpp=mpps.get(path))
            except SlideError as e:  # no tissue, unreadable, truncated or damaged file: the other slides still run
                problems.append(_slide_problem(path, e))
                continue
            if result.damaged:
                problems.append(_damaged_problem(path, result))
            if "geojson" in exports:  # QuPath's tile objects (docs/prediction.md)
                write_tiles_geojson(result.csv, json.loads(result.meta.read_text()),
                                    result.csv.with_name(f"{names[path]}.geojson"))
            rows.append(_slide_row(path, names[path], result, described.get(path, {}), classes, aggregate))
    except BaseException as e:  # a bug or an interrupt: the tables still say what was done before it
        problems.append(Problem(str(path), "run-stopped", f"the run stopped at this slide: {type(e).__name__}: {e}"))
        write_problems(out / "problems.csv", stopped=problems)
        raise
    finally:
        write_csv(rows, out / "slides.csv", columns)
    return rows, problems, {"metrics": {"predict/slides": float(len(rows))},
                            "images": {f"predict/heatmap_{Path(r['heatmap']).name.removesuffix('.heatmap.png')}":
                                       Path(r["heatmap"]) for r in rows},
                            "tables": {"predict/slides": rows}}
