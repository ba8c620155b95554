"""The k-fold image report of a training multirun, written into it when the sweep ends (a Hydra callback).

It is `histoflow predict ckpt_path=<multirun>` run in the same process: conf/predict.yaml composed with
`ckpt_path` set to the sweep (plus any overrides), written to `<multirun>/image_report/`. Its headline figures are
logged: pooled image accuracy with its interval over patients, mean ± sd over folds, case-level accuracy.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, open_dict

from histoflow.common.config import CONF_DIR
from histoflow.common.errors import HistoflowError, message
from histoflow.inference.bag_report import bag_runs, logged_maps, write_bag_report
from histoflow.inference.held_out import predict
from histoflow.inference.image_report import absent_warning
from histoflow.inference.report_run import publish_report
from histoflow.inference.target_report import task_headline
from histoflow.inference.task_report import is_task_sweep, write_task_report
from histoflow.training.outputs import REPORT_DIR

log = logging.getLogger(__name__)


def predict_config(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """conf/predict.yaml with overrides, as predict.py composes it, writing to output_dir. Runs beside a Hydra
    app (a multirun's end): that app's global state is put back afterwards."""
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("predict", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)  # ${hydra:runtime.output_dir} exists only in a Hydra run
    return cfg


def headline(report: dict[str, Any]) -> str:
    """The figures that matter, in one line: pooled image accuracy [interval over groups], mean ± sd over folds,
    and case-level accuracy."""
    pooled, summary = report["pooled"]["image/acc"], report["summary"]["image/acc"]
    unit = (report.get("settings") or {}).get("bag_level") or "image"  # image, or a bag head's slide | patient
    text = f"{unit} accuracy {pooled:.3f} pooled over {report['images']} {unit}s"
    interval, groups = report.get("interval") or {}, report.get("groups") or {}
    # patients or slides, not every image its own; patient bags: each row is a patient
    given = groups.get("n", report["images"]) < report["images"] or unit == "patient"
    case = report.get("case_level")
    if "image/acc" in interval:
        low, high = interval["image/acc"]
        named = "patients" if unit in ("patient", "slide") else "groups"  # slide bags: grouped by patient
        over = f"{groups.get('n', '?')} {named if given else unit + 's (each its own group: no patients given)'}"
        exact = ""
        if low == high and case and "exact" in case:  # all right or all wrong: the bootstrap has nothing to resample
            (low, high), exact = case["exact"], ", exact"
        text += f" [{interval.get('level', 0.95):.0%} CI {low:.2f}, {high:.2f}{exact} over {over}]"
    text += f", {summary['mean']:.3f} ± {summary['sd']:.3f} over {int(summary['n'])} folds"
    if case and given and unit != "patient":  # a patient bag is its own case
        text += f"; case-level {case['acc']:.2f} ({case['right']}/{case['groups']})"
    warning = absent_warning(report.get("absent_classes") or [], unit)
    return text + (f"; WARNING: {warning}" if warning else "")


def quoted(key: str, value: str | Path) -> str:
    """key=value as Hydra's override parser reads it back unchanged: the value quoted, so a path with brackets,
    parentheses, commas, spaces or non-ASCII letters (`runs (copy)`, `josé-runs`) is one string."""
    escaped = str(value).replace("'", "\\'")
    return f"{key}='{escaped}'"


def by_hand(sweep: Path) -> str:
    """The shell command that writes the sweep's report."""
    return f"histoflow predict {shlex.quote(quoted('ckpt_path', sweep))}"


def write_image_report(sweep: str | Path, overrides: Sequence[str] = ()) -> Path | None:
    """predict.py's k-fold report of the sweep in <sweep>/image_report/; None (with a warning saying why) where the
    sweep holds no k-fold set of models, e.g. a sweep over settings rather than folds."""
    sweep = Path(sweep).resolve()  # the report names its checkpoints wherever it is read from
    out = sweep / REPORT_DIR
    if is_task_sweep(bag_runs(sweep)):  # task=survival|regression: C-index, Kaplan-Meier; MAE, R², r
        task_report = write_task_report(sweep, out)
        log.info("%s report: %s\n  %s", task_report["task"], out / "report.md", task_headline(task_report))
        return out / "report.md"
    if bag_runs(sweep):  # heads on bags: each fold's bag predictions are the report's rows (no re-prediction)
        report = write_bag_report(sweep, out)
        publish_report(out, report, [sweep], images=logged_maps(out))  # its keys; beside the folds in W&B
        log.info("bag-level report: %s\n  %s", out / "report.md", headline(report))
        return out / "report.md"
    try:
        predict(predict_config([quoted("ckpt_path", sweep), *overrides], out))
    except HistoflowError as e:
        log.warning("no image-level report for %s: %s\n(run it by hand: %s)", sweep, message(e), by_hand(sweep))
        return None
    report = out / "report.md"
    if (out / "report.json").is_file():
        log.info("image-level report: %s\n  %s", report, headline(json.loads((out / "report.json").read_text())))
    return report


class ImageReport(Callback):
    """Hydra callback: once every job of a training multirun has returned, write predict.py's k-fold image-level
    report of it in <multirun>/image_report/ (`predict`: predict.py overrides for it, e.g. [aggregate=mean])."""

    def __init__(self, predict: Sequence[str] = ()) -> None:
        self.predict = list(predict)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            write_image_report(config.hydra.sweep.dir, self.predict)
        except Exception as e:
            # Hydra turns a callback's exception into a warning and exits 0: the user asked for the report, so its
            # failure is an error line and a failed command (SystemExit passes through Hydra)
            log.error("the image-level report of %s failed: %s: %s\nRun it by hand: %s", config.hydra.sweep.dir,
                      type(e).__name__, e, by_hand(Path(config.hydra.sweep.dir).resolve()))
            raise SystemExit(1) from e
