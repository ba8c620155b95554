"""Resuming a run: which checkpoint `ckpt_path` means (a file, or `last` of this run or sweep job), and whether
this run can go on from it (the same net, optimizer, scheduler and fold, the same data, slide table and bag level),
checked before anything is prepared."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from histoflow.common.config import local_file
from histoflow.common.errors import ConfigError, HistoflowError, MissingInputError
from histoflow.training.checkpoints import read_checkpoint

log = logging.getLogger(__name__)
RECENT_RUNS = 5  # how many runs holding a last checkpoint the error of an unresumable ckpt_path=last lists
RESUME_HINT = ("ckpt_path=last hydra.run.dir=<the interrupted run's folder>, or ckpt_path=<a .ckpt that train.py "
               "wrote, e.g. <run>/checkpoints/last.ckpt>")
# The settings a resumed run must share with its checkpoint, and why.
RESUME_MUST_MATCH = {
    "model._target_": "its weights fit only the same net",
    "model.name": "its weights fit only the same net",
    "encoder.name": "a head fits only the features of the same encoder",
    "encoder.weights": "a head fits only the features of the same encoder weights",
    "optimizer._target_": "its optimizer state (e.g. SGD's momentum, Adagrad's sums) fits only the same optimizer",
    "scheduler._target_": "its scheduler state fits only the same scheduler",
    "fold": "it was fitted on another fold's training part, which holds this fold's test images",
}
# The data a resumed run must share with its checkpoint: its folds and samples are those data's, and a sweep folder
# resumed with others would mix two data sets' rows in one report. Compared only where the checkpoint records them.
DATA_MUST_MATCH = {
    "data.name": "it was trained on another data set",
    "data.root": "it was trained on the images of another folder",
    "data.table": "it was trained on the slides of another slide table",
    "bag.level": "it was trained on bags of another level, and the sweep's report would mix their rows",
}
_ABSENT = object()


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def ddp_children_rerun_this_job(resume: Path | None) -> None:
    """In a multirun, make Lightning's DDP child processes re-run this job instead of the whole sweep, resuming
    from the checkpoint this process chose (`resume`, None: from scratch), which a child could not find by itself."""
    if not _is_multirun():
        return
    hydra_cfg = HydraConfig.get()
    # Lightning re-runs sys.argv plus hydra.run.dir=<HydraConfig run.dir> in each child process.
    overrides = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    sys.argv = [sys.argv[0], *overrides, f'ckpt_path="{resume}"' if resume else "ckpt_path=null"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def _recent_runs(root: Path, depth: int, files: list[Path]) -> list[Path]:
    """The folders in root, newest first, that hold one of files (relative paths) `depth` levels down (1: in
    the folder itself, as a run does; 2: in its sub-folders, as a multirun's jobs do)."""
    found = [f for rel in files for f in root.glob("/".join(["*"] * depth + [rel.as_posix()]))]
    found.sort(key=lambda f: f.stat().st_mtime, reverse=True)
    return list(dict.fromkeys(root / f.relative_to(root).parts[0] for f in found))[:RECENT_RUNS]


def _last_checkpoint(output_dir: Path, callbacks: list[Callback]) -> Path | None:
    """This run's last checkpoint, as Lightning's ckpt_path="last" finds it: last.ckpt in a ModelCheckpoint's folder.

    None (start from scratch, with a warning) for a multirun job without one while other jobs of its sweep have
    one: the sweep being resumed was interrupted before this job saved. Otherwise a missing one is an error that
    names where it looked, the runs that could be resumed, and how to point at one.
    """
    files = list(dict.fromkeys(Path(c.dirpath) / f"{c.CHECKPOINT_NAME_LAST}{c.FILE_EXTENSION}"
                               for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath))
    found = [f for f in files if f.is_file()]
    if found:
        return max(found, key=lambda f: f.stat().st_mtime)
    relative = [f.relative_to(output_dir) for f in files if f.is_relative_to(output_dir)]
    looked = ", ".join(str(f.parent) for f in files) or "(no ModelCheckpoint callback)"
    if not _is_multirun():
        runs = ", ".join(map(str, _recent_runs(output_dir.parent, 1, relative))) or "none"
        raise MissingInputError(f"ckpt_path=last: no last checkpoint in {looked}, in this run's folder (hydra.run.dir; "
                                f"a new, dated one when not given). Fix: point at the interrupted run, {RESUME_HINT} "
                                f"(recent runs with one: {runs})")
    sweep = output_dir.parent
    if _recent_runs(sweep, 1, relative):
        log.warning("ckpt_path=last: no last checkpoint in %s, but other jobs of the sweep %s have one: this job "
                    "starts from scratch", looked, sweep)
        return None
    runs = ", ".join(map(str, _recent_runs(sweep.parent, 2, relative))) or "none"
    raise MissingInputError(f"ckpt_path=last: no job of the sweep {sweep} has a last checkpoint (looked in {looked} "
                            f"and beside it). Fix: point at the interrupted multirun, histoflow train -m "
                            f"ckpt_path=last hydra.sweep.dir=<its folder> with its overrides (recent multiruns with "
                            f"one: {runs}), or ckpt_path=<a .ckpt that train.py wrote>")


def check_resumable(path: Path, cfg: DictConfig) -> None:
    """Fail before fitting, naming the file and the fix, unless path is a checkpoint this run can go on from."""
    if not path.is_file():
        raise MissingInputError(f"ckpt_path={path}: no such file. Fix: {RESUME_HINT}")
    try:  # weights_only: no pickled code runs, as when predicting
        checkpoint = read_checkpoint(path)
    except HistoflowError as e:
        raise ConfigError(f"ckpt_path: {e}. To resume: {RESUME_HINT}") from e
    missing = [k for k in ("state_dict", "optimizer_states") if k not in checkpoint]
    if missing:
        raise ConfigError(f"ckpt_path={path}: holds no {missing} (saved with save_weights_only?), so training cannot "
                          f"go on from it. Fix: {RESUME_HINT}")
    saved = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    for key, reason in RESUME_MUST_MATCH.items():
        theirs, ours = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        if key.endswith(".weights"):  # a file: the same one however it was named (relative before, absolute now)
            theirs, ours = local_file(theirs), local_file(ours)
        if theirs != ours:
            raise ConfigError(f"ckpt_path={path} was trained with {key}={theirs}, this run asks for {ours}: {reason}. "
                              f"Fix: resume with the settings it was trained with ({key}={theirs}), or leave out "
                              f"ckpt_path for a new run (a torchvision model can start from its weights: "
                              f"model.weights={path})")
    for key, reason in DATA_MUST_MATCH.items():
        theirs, ours = OmegaConf.select(saved, key, default=_ABSENT), OmegaConf.select(cfg, key)
        if theirs is _ABSENT:  # a checkpoint from before the key: nothing to compare
            continue
        if key in ("data.root", "data.table"):  # a path: the same place however it was written
            theirs, ours = _place(theirs), _place(ours)
        if theirs != ours:
            raise ConfigError(f"ckpt_path={path} was trained with {key}={theirs}, this run asks for {key}={ours}: "
                              f"{reason}. Fix: resume with the data it was trained on ({key}={theirs}), or start a "
                              "new run: leave out ckpt_path, or give a new hydra.sweep.dir (hydra.run.dir)")


def _place(value: object) -> object:
    """A path as an absolute one (from the working folder, where Hydra runs start), anything else as it is."""
    return str(Path(value).expanduser().absolute()) if isinstance(value, str) and value else value


def resume_checkpoint(cfg: DictConfig, callbacks: list[Callback]) -> Path | None:
    """The checked checkpoint that cfg.ckpt_path names (a file, or "last": see _last_checkpoint); None: none."""
    if cfg.get("ckpt_path") is None:
        return None
    ckpt = cfg.ckpt_path
    path = _last_checkpoint(Path(cfg.output_dir), callbacks) if ckpt == "last" else Path(ckpt).expanduser()
    if path is not None:
        check_resumable(path, cfg)
    return path
