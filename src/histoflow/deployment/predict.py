"""Prediction runs: the k-fold held-out report of a training multirun, a CSV of predictions for any images,
or maps over whole slides."""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import at_least, refuse_unknown_top_keys
from histoflow.common.errors import ConfigError, HistoflowError, MissingInputError
from histoflow.common.machine import resolve_device, resolve_workers
from histoflow.data.images import IMAGE_SUFFIXES
from histoflow.data.patches import PatchConfig
from histoflow.data.prepare import prepare_dataset
from histoflow.data.problems import Problem, write_problems
from histoflow.inference.bag_predict import bag_rows, predict_bags, value_rows
from histoflow.inference.cached_votes import cached_features, cached_votes
from histoflow.inference.external_report import external_report, folder_labels, image_groups
from histoflow.inference.fold_models import (
    FoldModel,
    check_compatible,
    encoder_groups,
    find_checkpoints,
    load_fold_model,
    models_by_fold,
)
from histoflow.inference.geojson import write_tiles_geojson
from histoflow.inference.image_report import fold_report, prediction_rows, write_csv
from histoflow.inference.model_settings import refuse_changes
from histoflow.inference.report_run import log_run, publish_report
from histoflow.inference.slide_map import SlideConfig, SlideResult, predict_slide
from histoflow.inference.target_report import external_task_report, new_image_targets
from histoflow.inference.voting import AGGREGATES, predict_images, tta_views
from histoflow.slides.backend import SLIDE_SUFFIXES, slides_in
from histoflow.slides.slide import SLIDE_FIXES, DamagedTileError, SlideError, SlideSettingError
from histoflow.slides.table import read_slide_table
from histoflow.slides.tiles import NoTissueError

log = logging.getLogger(__name__)


class BadImagesError(HistoflowError, ValueError):
    """Images that could not be predicted (with on_bad_image=error), reported after the others were written."""


def files_matching(spec: str | Sequence[str], suffixes: Sequence[str] | None = None,
                   key: str = "images") -> list[Path]:
    """Image files (key=slides: slide files) of a folder (searched recursively), a file, a glob pattern, or a list
    of these, in order; the files of a folder that are neither are listed in a warning."""
    suffixes = suffixes or (SLIDE_SUFFIXES if key == "slides" else IMAGE_SUFFIXES)
    found: list[Path] = []
    for entry in [spec] if isinstance(spec, str) else list(spec):
        path = Path(entry).expanduser()
        if not glob.has_magic(str(path)) and not path.exists():
            raise MissingInputError(f"{key}={entry}: no such file or folder. Fix: check the path (relative paths "
                                    f"start from {Path.cwd()})")
        if path.is_dir():
            every = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if key == "slides":
                files, skipped = slides_in(every)
            else:
                files = [p for p in every if p.suffix.lower() in suffixes]
                skipped = [p for p in every if p.suffix.lower() not in suffixes]
            if skipped:  # never in silence: a format left out looks like a slide that was not there
                kinds = Counter(p.suffix.lower() or "(no suffix)" for p in skipped)
                log.warning("%s=%s: %d file(s) skipped, not %s files histoflow reads (%s): %s%s", key, entry,
                            len(skipped), key[:-1], ", ".join(f"{n} {k}" for k, n in kinds.most_common()),
                            ", ".join(str(p.relative_to(path)) for p in skipped[:5]),
                            ", ..." if len(skipped) > 5 else "")
        elif path.is_file():
            files = [path]
        else:
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            example = "'dir/**/*.png'" if key == "images" else "'dir/*.svs'"
            raise MissingInputError(f"{key}={entry}: no {key[:-1]} files ({' '.join(suffixes)}) found there. "
                                    f"Fix: pass a folder, a file, a glob pattern such as {example}, or a list")
        found += files
    return list(dict.fromkeys(found))  # a file matched twice is predicted once


def prediction_grid(cfg: Mapping[str, Any], model: FoldModel) -> PatchConfig:
    """The grid of cfg.grid, each unset value taken from the model's training patches (36-px windows, stride 32)."""
    trained = dict(model.config["data"].get("patches") or {})
    for key in ("size", "stride"):  # 0 once became the training value and a negative stride ran, both in silence
        at_least(cfg.get(key), 1, f"grid.{key}", optional=True)
    size = cfg.get("size") or trained.get("size")
    stride = cfg.get("stride") if cfg.get("stride") is not None else trained.get("stride", 32)
    return PatchConfig(size=size, stride=int(stride), rotations=[0], resize=trained.get("resize"))


def _run_options(cfg: DictConfig) -> dict[str, Any]:
    """The predict_images arguments of the config."""
    tta = OmegaConf.to_container(cfg.tta) if OmegaConf.is_config(cfg.tta) else cfg.tta
    workers = resolve_workers(cfg.num_workers, "num_workers", resolve_device(cfg.device).type)
    return {"views": tta_views(tta), "batch_size": cfg.batch_size, "num_workers": workers,
            "device": cfg.device, "progress": cfg.progress}


def _wandb_init(cfg: DictConfig) -> dict[str, Any]:
    """publish_report's W&B arguments from cfg.wandb: enabled=true: log in its project and group (its other keys
    are wandb.init arguments); auto: where the multirun's fold jobs logged to W&B, beside them; false: never."""
    enabled = cfg.wandb.get("enabled", "auto")
    if enabled not in (True, False, "auto"):
        raise ConfigError(f"wandb.enabled={enabled!r}: expected auto, true or false")
    init = {k: v for k, v in cfg.wandb.items() if k != "enabled" and v is not None}
    return {"init": init if enabled is True else None, "tracked": enabled is not False}


def _held_out_report(cfg: DictConfig, members: list[list[FoldModel]], grid: PatchConfig, out: Path,
                     settings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Problem], dict[str, Any]]:
    """Each fold's models (one per ensemble member) on that fold's held-out images (from the manifest), then the
    k-fold report.

    Returns the rows of predictions.csv, the images that failed, and what goes to W&B.
    """
    by_fold = models_by_fold(members)
    overrides = cfg.get("data") or {}
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    prepared = None
    for fold, models in by_fold.items():
        for m in models:
            data = OmegaConf.to_container(OmegaConf.merge(m.config["data"], overrides), resolve=True)
            found = prepare_dataset(data, quiet=True)  # returns at once when the data set is prepared
            if prepared is not None and found.path != prepared.path:
                raise ConfigError(f"{m.path} was trained on {found.path}, other models on {prepared.path}: "
                                 "one report needs the folds of one data set")
            prepared = found
        assert prepared is not None
        check_compatible(models, prepared.classes, grid.size, f"the prepared data {prepared.path}")
        root = Path(overrides["root"]).expanduser() if overrides.get("root") else prepared.root  # images moved
        held_out = [r for r in prepared.manifest() if r["fold"] == fold]
        cached = cached_features(models, prepared, grid, _run_options(cfg)["views"])
        if cached is not None:  # a head's held-out windows as training embedded them: no encoder pass
            votes = cached_votes(cached, fold, held_out, root, models, len(prepared.classes))
            log.info("fold %s: held-out windows' features read from %s", fold, cached.path)
        else:
            votes = predict_images([root / r["image"] for r in held_out], encoder_groups(models),
                                   len(prepared.classes), grid, description=f"fold {fold}", **_run_options(cfg))
        checkpoints = ";".join(str(m.path) for m in models)  # several: an ensemble
        extra = [{"fold": fold, "label": r["label"], "group": r["group"], "checkpoint": checkpoints} for r in held_out]
        rows += prediction_rows(votes, prepared.classes, cfg.aggregate, extra)
        problems += votes.problems.values()
        log.info("fold %s: %d images in %.1f s (%.1f images/s)", fold, len(held_out), votes.seconds,
                 len(held_out) / max(votes.seconds, 1e-9))
    assert prepared is not None  # find_checkpoints returns at least one
    missing = [f for f in prepared.test_folds if f not in by_fold]
    if missing:
        log.warning("folds %s have no model here: their images are not predicted", missing)
    for r in rows:
        r["correct"] = r["predicted"] == r["label"]
    write_csv(rows, out / "predictions.csv")
    report = fold_report(rows, prepared.classes, out, settings, problems, missing)
    sources = settings["ckpt_path"] if isinstance(settings["ckpt_path"], list) else [settings["ckpt_path"]]
    publish_report(out, report, sources, **_wandb_init(cfg))
    return rows, problems, {}  # logged to W&B, where it is, with the report's own keys


def _images_csv(cfg: DictConfig, members: list[list[FoldModel]], grid: PatchConfig, out: Path,
                settings: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Problem], dict[str, Any]]:
    """Any images: all models' averaged probabilities (patch votes, or bag heads' bags of the training windows) per
    image in predictions.csv with the models' spread; where class folders give labels, the external report."""
    models = [m for ms in members for m in ms]
    spec = cfg.images if isinstance(cfg.images, str) else list(cfg.images)
    paths = files_matching(spec)
    classes, task = models[0].classes, models[0].task
    valued = task.name != "classification"  # a survival or regression head: a risk or value per image, no class
    labels = None if valued else folder_labels(paths, classes, str(cfg.get("labels", "auto")))  # before any work
    root = Path(spec).expanduser() if isinstance(spec, str) and Path(spec).expanduser().is_dir() else None
    groups = image_groups(paths, cfg.get("groups"), root) if labels or (valued and cfg.get("targets")) else []
    if models[0].is_bag:
        pred = predict_bags(paths, models, cfg.batch_size, _run_options(cfg)["num_workers"], cfg.device,
                            cfg.progress)
        rows = value_rows(pred, models) if valued else bag_rows(pred, classes)
        problems, seconds = list(pred.problems.values()), pred.seconds
    else:
        check_compatible(models, classes, grid.size, f"checkpoint {models[0].path}")
        votes = predict_images(paths, encoder_groups(models), len(classes), grid, **_run_options(cfg))
        rows, problems, seconds = prediction_rows(votes, classes, cfg.aggregate, spread=True), \
            list(votes.problems.values()), votes.seconds
    log.info("%d images in %.1f s (%.2f images/s)", len(paths), seconds, len(paths) / max(seconds, 1e-9))
    logged: dict[str, Any] = {"metrics": {"predict/images": float(len(rows))}, "images": {},
                              "tables": {"predict/predictions": rows}}
    if labels and rows:
        report = external_report(rows, paths, labels, groups, classes, out, {**settings, "models": len(models)},
                                 problems)
        logged["metrics"].update({f"predict/external/{k}": v for k, v in report["pooled"].items()})
        logged["images"]["predict/external/confusion_images"] = out / "confusion_images.png"
    elif valued and cfg.get("targets") and rows:  # survival or regression targets: the k-fold report's form
        by_path = dict(zip(map(str, paths), groups))
        report = external_task_report(new_image_targets(rows, str(cfg.targets), task, root,
                                                        [by_path[str(r["image"])] for r in rows]),
                                      task.name, out, {**settings, "models": len(models), "unit": "image"})
        logged["metrics"].update({f"predict/external/{k}": v for k, v in report["pooled"].items()
                                  if isinstance(v, (int, float))})
    elif valued:
        log.info("no targets=<table> of the new images' %s: predictions only, no report", ", ".join(task.columns))
    elif not labels:
        log.info("the images carry no labels (no folder named like a class of %s): predictions only, no report",
                 classes)
    write_csv(rows, out / "predictions.csv")
    return rows, problems, logged


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


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """The name of each slide's outputs (slides/<name>.tiles.csv ..., slides.csv's `output`): its file's name without
    suffix; in the order listed, a slide whose name an earlier slide took (a/s1.svs, b/s1.svs; or S1.svs and s1.svs,
    one file on a disk blind to case) gets `-2` after it, `-3`..., the first that no other slide has as its own: a/s1,
    b/s1, c/s1-2.svs are named s1, s1-3, s1-2. docs/prediction.md states the rule."""
    own = {p.stem.casefold() for p in paths}
    taken: set[str] = set()
    names: dict[Path, str] = {}
    for path in paths:
        name, n = path.stem, 1
        while name.casefold() in taken or (n > 1 and name.casefold() in own):
            n += 1
            name = f"{path.stem}-{n}"
        taken.add(name.casefold())
        names[path] = name
    return names


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


def _slides(cfg: DictConfig, members: list[list[FoldModel]], grid: PatchConfig, out: Path,
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


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run one prediction as configured (conf/predict.yaml); returns where the results are and how many."""
    refuse_unknown_top_keys(cfg, "predict")
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is needed: the trained model(s) to predict with. Fix: predict.py "
                          "ckpt_path=<a .ckpt, a training run's folder or a multirun's folder> [images=...]")
    resolve_device(cfg.device)  # a device that is not there is refused before any checkpoint is read
    if cfg.get("slides") and cfg.images is not None:  # the images were once left out in silence
        raise ConfigError(f"slides={cfg.slides} and images={cfg.images}: one run predicts slides or images. Fix: "
                          "run predict.py once for each")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.on_bad_image not in ("error", "skip"):
        raise ConfigError(f"on_bad_image={cfg.on_bad_image!r}: expected error or skip")
    listed = OmegaConf.is_list(cfg.ckpt_path)  # a list: an ensemble, one member per entry
    sources = [str(s) for s in cfg.ckpt_path] if listed else [str(cfg.ckpt_path)]
    encoder = cfg.get("encoder")
    # encoder.weights: where the same weights lie now; with any other encoder key the models load as trained, and
    # refuse_changes names the change
    weights = encoder.get("weights") if OmegaConf.is_dict(encoder) and set(encoder) <= {"weights"} else None
    members = [[load_fold_model(p, cfg.trusted_targets, weights) for p in find_checkpoints(s)] for s in sources]
    models = [m for ms in members for m in ms]
    refuse_changes(cfg, models)  # what the models see comes from their checkpoints: before any work
    grid = prediction_grid(cfg.grid, models[0])
    if models[0].is_bag:  # a bag is cut as training cut it
        grid = PatchConfig.from_config(models[0].config["data"].get("patches"))
    settings = {"ckpt_path": sources if listed else sources[0],
                "checkpoints": [str(m.path) for m in models],
                "aggregate": f"bag ({type(models[0].head).__name__}), the fold models' mean" if models[0].is_bag
                else cfg.aggregate,
                "views": len(_run_options(cfg)["views"]), "window": grid.size, "stride": grid.stride}
    run = _slides if cfg.get("slides") else _held_out_report if cfg.images is None else _images_csv
    rows, problems, logged = run(cfg, members, grid, out, settings)
    # always written, empty when nothing went wrong: its absence would not say whether the run checked
    write_problems(out / "problems.csv", **{"skipped" if cfg.on_bad_image == "skip" else "stopped": problems})
    if cfg.wandb.get("enabled") is True and logged:  # a k-fold report logs itself (publish_report)
        init = {"project": "histoflow", "job_type": "predict", **_wandb_init(cfg)["init"]}
        log_run(out, init, settings, logged["metrics"], logged["images"], logged["tables"])
    what = "slide" if cfg.get("slides") else "image"
    log.info("predicted %d %ss: %s", len(rows), what, out)
    if problems and cfg.on_bad_image == "skip":
        shown = "; ".join(p.detail for p in problems[:5]) + ("; ..." if len(problems) > 5 else "")
        log.warning("skipped %d %s(s) that could not be predicted (listed in %s): %s", len(problems), what,
                    out / "problems.csv", shown)
    if problems and cfg.on_bad_image == "error":
        fix = ("; ".join(SLIDE_FIXES[k] for k in sorted({p.kind for p in problems}) if k in SLIDE_FIXES)
               if cfg.get("slides") else "remove or repair these files (windows need images at least as large as "
               "grid.size)")
        raise BadImagesError(f"{len(problems)} {what}(s) could not be predicted:\n"
                             + "\n".join(f"  {p.detail}" for p in problems)
                             + f"\nThe other {len(rows)} {what}s' results are written in {out}. Fix: {fix}, or set "
                             "on_bad_image=skip to leave them out (they are listed in problems.csv)")
    return {"output_dir": str(out), "images": len(rows), "problems": len(problems)}
