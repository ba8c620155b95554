"""The cross-validation summary of a multirun folder: `histoflow summary outputs/train/multirun/<date>`.

It runs by itself at the end of `histoflow train -m fold=1,2,3,4,5` (a Hydra callback in conf/train.yaml);
this command writes it again, e.g. for a sweep that was interrupted and resumed.
"""

from __future__ import annotations

import logging
import sys

from histoflow.training.fold_summary import summarize_sweep
from histoflow.training.outputs import METRICS_FILE


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: histoflow summary <multirun folder>")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = summarize_sweep(sys.argv[1])
    sys.exit(0 if written else f"no {METRICS_FILE} found under {sys.argv[1]}")


if __name__ == "__main__":
    main()
