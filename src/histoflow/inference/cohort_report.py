"""External validation of a bag model on a labelled new cohort: the bags' rows (a patient's, or a slide's with its
patient as group) scored by the fold models together in the form of the k-fold report (image_report.fold_report:
accuracy, balanced accuracy, macro F1, ROC AUC for two classes, each with its 95% interval over patients, the exact
interval where every resample scores alike, confusion matrix, expected calibration error and reliability diagram),
plus the fold models' agreement: the share of bags where every fold model's own class is the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from histoflow.data.problems import Problem
from histoflow.inference.image_report import fold_report


def fold_agreement(rows: Sequence[Mapping[str, Any]], models: int) -> dict[str, Any]:
    """The share of rows whose fold models all give the same class (rows' models_agree)."""
    agree = [str(r["models_agree"]) == "True" for r in rows]
    return {"share": sum(agree) / len(agree) if agree else None, "bags": len(agree), "agree": sum(agree),
            "models": models}


def cohort_report(rows: list[dict[str, Any]], classes: list[str], out: Path, settings: Mapping[str, Any],
                  problems: Sequence[Problem] = ()) -> dict[str, Any]:
    """report.json, report.md and the figures of labelled new bags in `out`; returns the report."""
    report = fold_report(rows, classes, out, {**settings, "external": True}, problems, colour=False)
    report["fold_agreement"] = agreement = fold_agreement(rows, int(settings.get("models") or 1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    unit = settings.get("bag_level", "slide")
    with (out / "report.md").open("a") as md:
        md.write(f"\n## External validation\n\nEvery {unit} of the new cohort predicted by all {agreement['models']} "
                 "fold models together (their probabilities averaged); the figures above are one external \"fold\". "
                 f"Fold models' agreement: all give the same class to {agreement['agree']} of {agreement['bags']} "
                 f"{unit}s ({agreement['share']:.3f}); the spread of their probabilities per {unit}: prob_sd_<class> "
                 f"in slides.csv and patients.csv. Calibration: ECE {report['calibration']['ece']:.3f} "
                 "(reliability_images.png).\n")
    return report
