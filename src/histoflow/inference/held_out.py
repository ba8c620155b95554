"""A prediction run's frame, and the k-fold report's run inside it: each fold's models on that fold's held-out images.

Every `histoflow predict` run begins the same way (start_run: the config checked, the fold models loaded and held
to what their checkpoints fix, the prediction grid) and ends the same way (end_run: problems.csv, W&B, the error
naming what could not be predicted). Between them the k-fold report (held_out_report) or deployment's new images
and slides (histoflow.deployment.predict). `predict` here is the k-fold report alone, as a multirun's end writes it
(inference/sweep_report.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import at_least, refuse_unknown_top_keys
from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.common.machine import resolve_device, resolve_workers
from histoflow.data.patches import PatchConfig
from histoflow.data.prepare import prepare_dataset
from histoflow.data.problems import Problem, write_problems
from histoflow.inference.cached_votes import cached_features, cached_votes
from histoflow.inference.fold_models import (
    FoldModel,
    check_compatible,
    encoder_groups,
    find_checkpoints,
    load_fold_model,
    models_by_fold,
)
from histoflow.inference.image_report import fold_report, prediction_rows, write_csv
from histoflow.inference.model_settings import refuse_changes
from histoflow.inference.report_run import log_run, publish_report
from histoflow.inference.voting import predict_images, tta_views
from histoflow.slides.slide import SLIDE_FIXES

log = logging.getLogger(__name__)


class BadImagesError(HistoflowError, ValueError):
    """Images that could not be predicted (with on_bad_image=error), reported after the others were written."""


def prediction_grid(cfg: Mapping[str, Any], model: FoldModel) -> PatchConfig:
    """The grid of cfg.grid, each unset value taken from the model's training patches (36-px windows, stride 32)."""
    trained = dict(model.config["data"].get("patches") or {})
    for key in ("size", "stride"):  # 0 once became the training value and a negative stride ran, both in silence
        at_least(cfg.get(key), 1, f"grid.{key}", optional=True)
    size = cfg.get("size") or trained.get("size")
    stride = cfg.get("stride") if cfg.get("stride") is not None else trained.get("stride", 32)
    return PatchConfig(size=size, stride=int(stride), rotations=[0], resize=trained.get("resize"))


def run_options(cfg: DictConfig) -> dict[str, Any]:
    """The predict_images arguments of the config."""
    tta = OmegaConf.to_container(cfg.tta) if OmegaConf.is_config(cfg.tta) else cfg.tta
    workers = resolve_workers(cfg.num_workers, "num_workers", resolve_device(cfg.device).type)
    return {"views": tta_views(tta), "batch_size": cfg.batch_size, "num_workers": workers,
            "device": cfg.device, "progress": cfg.progress}


def wandb_init(cfg: DictConfig) -> dict[str, Any]:
    """publish_report's W&B arguments from cfg.wandb: enabled=true: log in its project and group (its other keys
    are wandb.init arguments); auto: where the multirun's fold jobs logged to W&B, beside them; false: never."""
    enabled = cfg.wandb.get("enabled", "auto")
    if enabled not in (True, False, "auto"):
        raise ConfigError(f"wandb.enabled={enabled!r}: expected auto, true or false")
    init = {k: v for k, v in cfg.wandb.items() if k != "enabled" and v is not None}
    return {"init": init if enabled is True else None, "tracked": enabled is not False}


def held_out_report(cfg: DictConfig, members: list[list[FoldModel]], grid: PatchConfig, out: Path,
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
        cached = cached_features(models, prepared, grid, run_options(cfg)["views"])
        if cached is not None:  # a head's held-out windows as training embedded them: no encoder pass
            votes = cached_votes(cached, fold, held_out, root, models, len(prepared.classes))
            log.info("fold %s: held-out windows' features read from %s", fold, cached.path)
        else:
            votes = predict_images([root / r["image"] for r in held_out], encoder_groups(models),
                                   len(prepared.classes), grid, description=f"fold {fold}", **run_options(cfg))
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
    publish_report(out, report, sources, **wandb_init(cfg))
    return rows, problems, {}  # logged to W&B, where it is, with the report's own keys


def start_run(cfg: DictConfig) -> tuple[Path, list[list[FoldModel]], PatchConfig, dict[str, Any]]:
    """A prediction's beginning (conf/predict.yaml): the config checked, the fold models of each ensemble member
    loaded and held to their checkpoints, before any work. Returns the output folder, the members' models, the grid
    and the run's settings (the report's record of them)."""
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
                "views": len(run_options(cfg)["views"]), "window": grid.size, "stride": grid.stride}
    return out, members, grid, settings


def end_run(cfg: DictConfig, out: Path, settings: Mapping[str, Any], rows: list[dict[str, Any]],
            problems: list[Problem], logged: Mapping[str, Any]) -> dict[str, Any]:
    """A prediction's end: problems.csv, the run in W&B where asked, and the inputs that could not be predicted
    (skipped with a warning, or an error naming each). Returns where the results are and how many."""
    # always written, empty when nothing went wrong: its absence would not say whether the run checked
    write_problems(out / "problems.csv", **{"skipped" if cfg.on_bad_image == "skip" else "stopped": problems})
    if cfg.wandb.get("enabled") is True and logged:  # a k-fold report logs itself (publish_report)
        init = {"project": "histoflow", "job_type": "predict", **wandb_init(cfg)["init"]}
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


def predict(cfg: DictConfig) -> dict[str, Any]:
    """The k-fold report of a run or multirun (conf/predict.yaml with neither images nor slides): each fold's models
    on its held-out images. New images and slides are deployment's (histoflow.deployment.predict)."""
    if cfg.get("images") is not None or cfg.get("slides"):
        raise ConfigError(f"images={cfg.get('images')}, slides={cfg.get('slides')}: the k-fold report predicts each "
                          "fold's held-out images, no others. Fix: leave images and slides out of its overrides; "
                          "predict new images or slides with `histoflow predict ckpt_path=... images=...`")
    out, members, grid, settings = start_run(cfg)
    return end_run(cfg, out, settings, *held_out_report(cfg, members, grid, out, settings))
