"""The colour-only baseline and calibration helpers of the five-fold report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoflow.evaluation.colour_baseline import (
    colour_features,
    cross_validated_predictions,
)
from histoflow.evaluation.figures import reliability_bins, save_reliability_diagram


def test_colour_features_are_rgb_mean_and_sd(tmp_path: Path) -> None:
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[:2] = (10, 20, 30)
    pixels[2:] = (30, 20, 10)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_allclose(colour_features([tmp_path / "a.png"]), [[20, 20, 20, 10, 0, 10]])


def test_each_fold_is_predicted_by_a_model_fit_on_the_other_folds() -> None:
    rng = np.random.default_rng(0)
    # class A is red and B blue in folds 1-3; fold 4 swaps the colours, so a model that had seen fold 4
    # would not get all of fold 4 wrong
    labels = ["A", "B"] * 40
    folds = [str(1 + i // 20) for i in range(80)]
    red, blue = np.array([200, 50, 50, 20, 20, 20.0]), np.array([50, 50, 200, 20, 20, 20.0])
    features = np.array([(red if (lab == "A") != (f == "4") else blue) + rng.normal(0, 5, 6)
                         for lab, f in zip(labels, folds)])
    predicted = np.array(cross_validated_predictions(features, labels, folds))
    truth, fold = np.array(labels), np.array(folds)
    assert (predicted[fold != "4"] == truth[fold != "4"]).mean() > 0.9
    assert (predicted[fold == "4"] != truth[fold == "4"]).all()


def test_reliability_bins_and_diagram(tmp_path: Path) -> None:
    confidence = np.array([0.35, 0.38, 0.95, 0.92, 0.99, 1.0])
    correct = np.array([0, 1, 1, 1, 0, 1])
    bins = reliability_bins(confidence, correct, bins=10)
    assert [(round(b["low"], 6), b["count"]) for b in bins] == [(0.3, 2.0), (0.9, 4.0)]
    np.testing.assert_allclose([b["accuracy"] for b in bins], [0.5, 0.75])
    np.testing.assert_allclose([b["confidence"] for b in bins], [0.365, 0.965])
    png = save_reliability_diagram(confidence, correct, tmp_path / "r.png", "t")
    assert Image.open(png).size[0] > 100


def test_a_forest_finds_colour_that_no_line_separates() -> None:
    # class A is either dark or bright, class B in between: one colour axis, no linear boundary
    rng = np.random.default_rng(0)
    labels = ["A", "B", "A"] * 30
    level = {0: 40.0, 1: 128.0, 2: 215.0}
    features = np.array([[level[i % 3]] * 3 + [20.0] * 3 for i in range(90)]) + rng.normal(0, 5, (90, 6))
    folds = [str(1 + i % 5) for i in range(90)]
    truth = np.array(labels)
    linear = np.array(cross_validated_predictions(features, labels, folds, classifier="logistic"))
    forest = np.array(cross_validated_predictions(features, labels, folds, classifier="forest"))
    assert (forest == truth).mean() == 1.0
    assert (linear == truth).mean() < 0.8
    with pytest.raises(ValueError, match="forest"):
        cross_validated_predictions(features, labels, folds, classifier="svm")
