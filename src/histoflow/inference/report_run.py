"""A k-fold report as figures to compare recipes by: its summary keys (report.json `keys`, the multirun's
summary.json `report`), and its W&B run beside the folds' runs (same group, job_type=report) wherever they logged
to W&B. One path for every report (patch votes, heads on frozen features, bag heads) and for predict's own runs.

The keys are numbers, so that W&B's runs table sorts and filters by them (docs/training.md, "Comparing recipes").
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from histoflow.common.files import atomic_path
from histoflow.training.outputs import METRICS_FILE, SUMMARY_FILE, job_order
from histoflow.training.tracking import configure_wandb, finish_wandb

log = logging.getLogger(__name__)
FIGURES = {"report/confusion": "confusion_images.png", "report/reliability": "reliability_images.png",
           "report/attention_gallery": "attention_gallery.png"}  # logged where the report drew them
PER_FOLD = ["image/acc", "image/balanced_acc", "image/f1_macro", "patch/acc"]


def _interval(keys: dict[str, float], name: str, bounds: Sequence[float]) -> None:
    keys[f"{name}_low"], keys[f"{name}_high"] = float(bounds[0]), float(bounds[1])


def task_keys(report: Mapping[str, Any]) -> dict[str, float]:
    """A survival or regression report's figures as flat keys: survival: `report/cindex` with its 95% interval over
    patients, `report/logrank_p`; regression: `report/mae`, `report/r2`, `report/pearson_r` with theirs; each with
    mean and sd over folds; patients, rows and folds."""
    pooled, keys = report["pooled"], {}
    if report["task"] == "survival":
        keys["report/cindex"] = pooled["cindex"]
        _interval(keys, "report/cindex", pooled["interval"])
        keys["report/logrank_p"] = pooled.get("logrank_p")
        keys["report/events"] = report.get("events")
    else:
        for metric, interval in pooled["interval"].items():
            keys[f"report/{metric}"] = pooled[metric]
            _interval(keys, f"report/{metric}", interval)
    for metric, summary in report["summary"].items():
        keys[f"report/{metric}_mean"], keys[f"report/{metric}_sd"] = summary["mean"], summary["sd"]
    keys.update({"report/patients": report["patients"], "report/images": report["n"],
                 "report/folds": len(report["per_fold"])})
    return {k: float(v) for k, v in keys.items() if v is not None and math.isfinite(float(v))}


def report_keys(report: Mapping[str, Any]) -> dict[str, float]:
    """The report's figures as flat numeric keys: pooled accuracy with its 95% interval over patients (the exact
    interval over cases where every bootstrap resample scores alike: `report/acc_exact` 1), balanced accuracy and
    macro F1 with theirs, case-level accuracy with its interval, mean ± sd over folds, the colour-only baselines
    (`report/colour_acc`: the stronger), ECE, ROC AUC (two classes), and how many patients (`report/patients_named`
    0: the rows named none, each image its own), images and folds. An interval that every resample puts at one value
    (all right or all wrong) is the exact (Clopper-Pearson) one over the cases instead."""
    if report.get("task") in ("survival", "regression"):
        return task_keys(report)
    pooled, interval, case = report["pooled"], report["interval"], report["case_level"]
    keys: dict[str, float] = {"report/acc": pooled["image/acc"]}
    low, high = interval["image/acc"]
    exact = low == high and "exact" in case
    _interval(keys, "report/acc", case["exact"] if exact else (low, high))
    keys["report/acc_exact"] = float(exact)
    for metric in ("balanced_acc", "f1_macro"):
        keys[f"report/{metric}"] = pooled[f"image/{metric}"]
        _interval(keys, f"report/{metric}", interval[f"image/{metric}"])
    keys["report/case_acc"] = case["acc"]
    low, high = case["interval"]
    _interval(keys, "report/case_acc", case["exact"] if low == high and "exact" in case else (low, high))
    keys["report/patch_acc"] = pooled["patch/acc"]
    for metric in PER_FOLD:
        summary = report["summary"].get(metric)
        if summary:
            name = metric.replace("image/", "").replace("/", "_")
            keys[f"report/{name}_mean"], keys[f"report/{name}_sd"] = summary["mean"], summary["sd"]
    colour = {name: b["pooled"]["image/acc"] for name, b in (report.get("colour_baselines") or {}).items()}
    for name, acc in colour.items():
        keys[f"report/colour_{name}_acc"] = acc
    if colour:
        best = max(colour, key=colour.__getitem__)
        keys["report/colour_acc"] = colour[best]
        _interval(keys, "report/colour_acc", report["colour_baselines"][best]["interval"]["image/acc"])
    keys["report/ece"] = report["calibration"]["ece"]
    if report.get("roc_auc"):
        keys["report/roc_auc"] = report["roc_auc"]["value"]
        _interval(keys, "report/roc_auc", report["roc_auc"]["interval"])
    keys["report/patients"] = float(report["groups"]["n"])  # where the rows named none: each image its own
    groups, patient_bags = report["groups"], (report.get("settings") or {}).get("bag_level") == "patient"
    keys["report/patients_named"] = float(groups["given"] and (groups["n"] < report["images"] or patient_bags))
    keys["report/images"] = float(report["images"])
    keys["report/folds"] = float(len(report["per_fold"]))
    return {k: float(v) for k, v in keys.items() if v is not None and math.isfinite(float(v))}


def multirun_of(source: str | Path) -> Path | None:
    """The multirun folder `source` is (a folder of jobs: test_metrics.json or .hydra/config.yaml), else None."""
    path = Path(source)
    jobs = [*path.glob(f"*/{METRICS_FILE}"), *path.glob("*/.hydra/config.yaml")] if path.is_dir() else []
    return path.resolve() if jobs else None


def job_config(run: Path) -> dict[str, Any]:
    """A job's config (<run>/.hydra/config.yaml), resolved as it was in the job: `${hydra:runtime...}` read from its
    .hydra/hydra.yaml. Unresolved (as saved) where that fails."""
    saved = run / ".hydra" / "config.yaml"
    text = saved.read_text()
    try:
        hydra = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra
        cfg = OmegaConf.create(text.replace("${hydra:", "${hydra."))
        cfg.hydra = {"runtime": hydra.runtime, "job": hydra.job}
        resolved = OmegaConf.to_container(cfg, resolve=True)
        del resolved["hydra"]
        return resolved
    except Exception as e:  # a resolver of the job's that is not here, a moved or edited file
        log.warning("%s: not resolved (%s: %s); its W&B config is logged as saved", saved, type(e).__name__, e)
        return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def sweep_tracking(sweep: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(wandb.init arguments of the report run, the sweep's config) where the multirun's jobs logged to W&B (a
    logger whose _target_ is a WandbLogger), in their project and group; None where they did not."""
    configs = sorted(sweep.glob("*/.hydra/config.yaml"), key=lambda p: job_order(p.parent))
    if not configs:
        return None
    config = job_config(configs[0].parent.parent)
    trackers = [c for c in (config.get("logger") or {}).values()
                if isinstance(c, dict) and str(c.get("_target_", "")).endswith("WandbLogger")]
    if not trackers:
        return None
    tracker = trackers[0]
    group = tracker.get("group") or config.get("name")
    init = {"project": tracker.get("project") or "histoflow", "entity": tracker.get("entity"), "group": group,
            "name": f"{group}-report" if group else None, "job_type": "report", "tags": ["report"]}
    config = {**config, "fold": None, "output_dir": str(sweep), "sweep": str(sweep),
              "folds": [job_config(c.parent.parent).get("fold") for c in configs]}
    return init, config


def report_tables(report: Mapping[str, Any], sweep: Path | None) -> dict[str, list[dict[str, Any]]]:
    """The tables of a report run: per fold with mean ± sd (the report's), the folds' own test metrics with mean ±
    sd (summary.json), and the misclassified rows."""
    per_fold = [{"fold": fold, **values} for fold, values in report["per_fold"].items()]
    per_fold += [{"fold": stat, **{m: s[stat] for m, s in report["summary"].items()}} for stat in ("mean", "sd")]
    tables = {"report/per_fold": per_fold, "report/misclassified": list(report.get("misclassified") or [])}
    summary = json.loads((sweep / SUMMARY_FILE).read_text()) if sweep and (sweep / SUMMARY_FILE).is_file() else None
    if summary:
        rows = [{"fold": fold, **values} for fold, values in summary["per_fold"].items()]
        rows += [{"fold": stat, **{m: s[stat] for m, s in summary["summary"].items()}} for stat in ("mean", "sd")]
        tables["folds/test_metrics"] = rows
    return tables


def fold_keys(sweep: Path | None) -> dict[str, float]:
    """The folds' own test metrics (summary.json) as mean and sd keys: `folds/test/acc_macro_mean`, ..._sd."""
    if not sweep or not (sweep / SUMMARY_FILE).is_file():
        return {}
    summary = json.loads((sweep / SUMMARY_FILE).read_text())["summary"]
    return {f"folds/{m}_{stat}": float(s[stat]) for m, s in summary.items() if m.startswith("test/")
            for stat in ("mean", "sd")}


def record_keys(out: Path, report: dict[str, Any], sweep: Path | None) -> dict[str, float]:
    """Write the report's keys into <out>/report.json (`keys`) and, for a multirun, its summary.json (`report`)."""
    keys = report_keys(report)
    report["keys"] = keys
    with atomic_path(out / "report.json") as path:
        path.write_text(json.dumps(report, indent=1))
    if sweep and (sweep / SUMMARY_FILE).is_file():
        summary = json.loads((sweep / SUMMARY_FILE).read_text())
        summary["report"] = keys
        with atomic_path(sweep / SUMMARY_FILE) as path:
            path.write_text(json.dumps(summary, indent=1))
    return keys


def log_run(out_dir: Path, init: Mapping[str, Any], config: Mapping[str, Any], summary: Mapping[str, float],
            images: Mapping[str, Path], tables: Mapping[str, list[dict[str, Any]]]) -> str | None:
    """One W&B run (offline without key or network) under <out_dir>/wandb: summary keys, images and tables; closed
    afterwards. Returns the run's folder (None where W&B is disabled)."""
    configure_wandb()
    import wandb  # here: a report without W&B never pays for its import

    try:
        run = wandb.init(dir=str(out_dir), config=dict(config), **{k: v for k, v in init.items() if v is not None})
        payload: dict[str, Any] = {k: wandb.Image(str(p)) for k, p in images.items() if Path(p).is_file()}
        for key, rows in tables.items():
            columns = list(dict.fromkeys(c for r in rows for c in r)) or ["image"]
            payload[key] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        run.log(payload)
        run.summary.update(dict(summary))  # after log: the keys stay as given, the runs table sorts by them
        return getattr(run, "dir", None)
    finally:
        finish_wandb()


def publish_report(out: Path, report: dict[str, Any], sources: Sequence[str | Path],
                   init: Mapping[str, Any] | None = None, tracked: bool = True,
                   images: Mapping[str, Path] | None = None) -> dict[str, float]:
    """Record a k-fold report's keys (report.json, the multirun's summary.json) and log it as a W&B run (its keys,
    FIGURES and `images`, the per-fold tables, the sweep's config): where `init` is given (predict
    wandb.enabled=true), with those wandb.init arguments; else, `tracked`, where the one multirun of `sources`
    logged to W&B, beside its folds (same project and group, job_type=report); else not at all. Returns the keys."""
    sweep = multirun_of(sources[0]) if len(sources) == 1 else None
    keys = record_keys(out, report, sweep)
    tracking = sweep_tracking(sweep) if sweep and (init is not None or tracked) else None
    if init is None and tracking is None:
        return keys
    run_init, run_config = tracking if tracking else ({"project": "histoflow", "job_type": "report"}, {})
    run_init = {**run_init, **(init or {})}
    run_config = {**run_config, "report": report.get("settings", {})}
    figures = {**{key: out / name for key, name in FIGURES.items()}, **(images or {})}
    log_run(out, run_init, run_config, {**keys, **fold_keys(sweep)}, figures, report_tables(report, sweep))
    log.info("k-fold report logged to W&B: project %s, group %s, run %s", run_init.get("project"),
             run_init.get("group"), run_init.get("name"))
    return keys
