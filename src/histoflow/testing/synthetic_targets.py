"""Made-up survival targets for real images, for tests and the worked example (docs/survival.md): no survival cohort
is reachable here, so each patient's time is drawn from an exponential hazard that depends on the patient's class
(a head that sees the class ranks patients well: C-index well above 0.5), censored at a uniform time; `shuffled`
gives the same (time, event) pairs dealt to the patients at random (nothing to learn: C-index about 0.5)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping

import numpy as np

HAZARDS = (0.1, 1.0, 10.0)  # per unit of time, of the classes in sorted order (CLL, FL, MCL for the lymphoma cases)
CENSOR = 3.0  # censoring times uniform on [0, CENSOR]: about a quarter to a third of the patients censored


def synthetic_survival(classes: Mapping[str, str], seed: int = 0, shuffled: bool = False,
                       hazards: tuple[float, ...] = HAZARDS, censor: float = CENSOR) -> dict[str, tuple[float, int]]:
    """Each patient's (time, event) from its class (patient -> class): time ~ Exponential(hazard of the class),
    censored at Uniform(0, censor); shuffled: the same pairs dealt to the patients in a seeded random order."""
    names = sorted(set(classes.values()))
    if len(names) > len(hazards):
        raise ValueError(f"{len(names)} classes but {len(hazards)} hazards: give one hazard a class")
    rng = np.random.default_rng(seed)
    patients = sorted(classes)
    rate = np.array([hazards[names.index(classes[p])] for p in patients])
    event_time, censor_time = rng.exponential(1 / rate), rng.uniform(0, censor, len(patients))
    pairs = [(round(float(min(t, c)), 4), int(t <= c)) for t, c in zip(event_time, censor_time)]
    if shuffled:
        pairs = [pairs[i] for i in np.random.default_rng(seed + 1).permutation(len(pairs))]
    return dict(zip(patients, pairs))


def write_survival_table(targets: Mapping[str, tuple[float, int]], path: Path, key: str = "patient") -> Path:
    """A target table <key>,time,event (task.table of task=survival; key: patient, slide or image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key, "time", "event"])
        writer.writerows([p, t, e] for p, (t, e) in sorted(targets.items()))
    return path
