"""`histoflow predict`'s one entry: a head on slide or patient bags given slides=... puts the multirun to work on a new
cohort (deployment/cohort_predict.py); patch models and heads on image bags predict new images
(deployment/predict.py), new slides as maps (deployment/slide_predict.py), or, given neither, the k-fold report of
their held-out images (inference/held_out.py), each run begun and ended alike (start_run, end_run)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import refuse_unknown_top_keys
from histoflow.common.errors import ConfigError
from histoflow.common.machine import resolve_device
from histoflow.data.problems import write_problems
from histoflow.deployment.cohort_predict import is_cohort_run, predict_cohort
from histoflow.deployment.predict import predict_new_images
from histoflow.deployment.slide_predict import predict_slides
from histoflow.inference.held_out import BadImagesError, end_run, held_out_report, start_run, wandb_init
from histoflow.inference.report_run import log_run
from histoflow.slides.slide import SLIDE_FIXES

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run one prediction as configured (conf/predict.yaml); returns where the results are and how many."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not is_cohort_run(cfg):
        return predict_models(cfg)
    refuse_unknown_top_keys(cfg, "predict")
    resolve_device(cfg.device)
    if cfg.images is not None:
        raise ConfigError(f"slides={cfg.slides} and images={cfg.images}: one run predicts slides or images. Fix: "
                          "run predict.py once for each")
    if cfg.on_bad_image not in ("error", "skip"):
        raise ConfigError(f"on_bad_image={cfg.on_bad_image!r}: expected error or skip")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, problems, logged = predict_cohort(cfg, out, {"ckpt_path": str(cfg.ckpt_path)})
    write_problems(out / "problems.csv", **{"skipped" if cfg.on_bad_image == "skip" else "stopped": problems})
    if cfg.wandb.get("enabled") is True and logged:
        log_run(out, {"project": "histoflow", "job_type": "predict", **wandb_init(cfg)["init"]},
                {"ckpt_path": str(cfg.ckpt_path)}, logged["metrics"], logged["images"], logged["tables"])
    log.info("predicted %d slides: %s", len(rows), out)
    if problems:
        shown = "; ".join(p.detail for p in problems[:5]) + ("; ..." if len(problems) > 5 else "")
        if cfg.on_bad_image == "error":
            fix = "; ".join(SLIDE_FIXES[k] for k in sorted({p.kind for p in problems}) if k in SLIDE_FIXES)
            raise BadImagesError(f"{len(problems)} slide(s) gave no bag: {shown}. The other {len(rows)} slides' "
                                 f"results are written in {out}. Fix: {fix or 'check them'}, or set "
                                 "on_bad_image=skip to leave them out (they are listed in problems.csv)")
        log.warning("left out %d slide(s) that gave no bag (listed in %s): %s", len(problems), out / "problems.csv",
                    shown)
    return {"output_dir": str(out), "images": len(rows), "problems": len(problems)}


def predict_models(cfg: DictConfig) -> dict[str, Any]:
    """Patch models or heads on image bags: new slides as maps (slides=...), new images (images=...), or neither: the
    k-fold report of each fold's held-out images."""
    out, members, grid, settings = start_run(cfg)
    run = predict_slides if cfg.get("slides") else held_out_report if cfg.images is None else predict_new_images
    return end_run(cfg, out, settings, *run(cfg, members, grid, out, settings))
