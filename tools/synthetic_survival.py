"""Synthetic survival targets for a labelled cohort (docs/survival.md's worked example): a patient,time,event table
whose times depend on each patient's class, and the same times shuffled across patients.

    python tools/synthetic_survival.py ../shared/data/lymphoma/cases.csv work/survival [--seed 0]

reads a table with the columns label and group (the patient; cases.csv: image,label,group) and writes
<out>/survival.csv and <out>/survival_shuffled.csv (histoflow.testing.synthetic_targets), for task.table.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from histoflow.testing.synthetic_targets import synthetic_survival, write_survival_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", type=Path, help="CSV with label and group (patient) columns")
    parser.add_argument("out", type=Path, help="folder for survival.csv and survival_shuffled.csv")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with args.cases.open(newline="") as handle:
        classes = {row["group"]: row["label"] for row in csv.DictReader(handle)}
    for name, shuffled in (("survival.csv", False), ("survival_shuffled.csv", True)):
        targets = synthetic_survival(classes, args.seed, shuffled)
        path = write_survival_table(targets, args.out / name)
        events = sum(e for _, e in targets.values())
        print(f"{path}: {len(targets)} patients, {events} events")


if __name__ == "__main__":
    main()
