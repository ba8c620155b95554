"""The cross-validation summary of multirun folders: `histoflow summary outputs/train/multirun/<date> [<another>
...]`.

It runs by itself at the end of `histoflow train -m fold=1,2,3,4,5` (a Hydra callback in conf/train.yaml);
this command, given one folder, writes its summary.md again (e.g. for a sweep that was interrupted and resumed).
Then, for one folder or several (read only), it prints their k-fold reports side by side, one row a recipe, with
their intervals (histoflow.inference.recipes).
"""

from __future__ import annotations

import logging
import sys

from histoflow.common.errors import HistoflowError, message
from histoflow.inference.recipes import comparison_table, sweep_row
from histoflow.training.fold_summary import summarize_sweep
from histoflow.training.outputs import METRICS_FILE


def main() -> None:
    folders = sys.argv[1:]
    if not folders or any(f.startswith("-") for f in folders):
        sys.exit("usage: histoflow summary <multirun folder> [<multirun folder> ...]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(folders) == 1 and not summarize_sweep(folders[0]):
        sys.exit(f"no {METRICS_FILE} found under {folders[0]}")
    try:
        rows = [sweep_row(folder) for folder in folders]
    except HistoflowError as e:
        sys.exit(message(e))
    print(comparison_table(rows), end="")


if __name__ == "__main__":
    main()
