"""Checks every command makes before its first job (a Hydra callback, conf/hydra/default.yaml): what would fail
inside Hydra or its launcher, outside the command's own error handling, and show a traceback there.

- the run's folder (hydra.run.dir) or the sweep's (hydra.sweep.dir) must be a folder that can be written;
- `hydra/launcher=slurm` needs SLURM's `sbatch` on this machine (a cluster's login node).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from histoflow.common.errors import HistoflowError, NotWritableError
from histoflow.data.locks import writable

SLURM_LAUNCHER = "SlurmLauncher"  # the submitit plugin's launcher class behind hydra/launcher=slurm


def refuse(error: HistoflowError) -> None:
    """End the command before any job with the error's one line (as report_errors shows errors inside a job)."""
    print(f"Error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1)  # SystemExit passes through Hydra's callbacks; any other exception becomes a traceback


def check_output_folder(folder: str, key: str) -> None:
    try:
        writable(Path(folder), "this run's outputs", f"set {key} to a folder you can write (or paths.log_dir, "
                 "$HISTOFLOW_LOGS, for every run)")
    except NotWritableError as e:
        refuse(e)


def check_launcher(config: DictConfig) -> None:
    target = str(config.hydra.launcher.get("_target_", ""))
    if target.endswith(SLURM_LAUNCHER) and shutil.which("sbatch") is None:
        refuse(HistoflowError("hydra/launcher=slurm: this machine has no SLURM (no sbatch command). Fix: run it on "
                              "the cluster's login node, or leave out hydra/launcher=slurm to run the jobs here"))


class BeforeJobs(Callback):
    """Hydra callback: the checks above, before a run's job or a sweep's first job."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_launcher(config)
        check_output_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
