"""Uncertainty over patients: the bootstrap resamples groups, case-level accuracy by majority."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from histoflow.evaluation.intervals import (
    accuracy,
    balanced_accuracy,
    case_calls,
    case_level,
    clopper_pearson,
    group_bootstrap,
    group_bootstrap_auc,
    macro_f1,
    roc_auc,
)
from histoflow.inference.image_report import fold_report
from histoflow.inference.sweep_report import headline

CLASSES = ["A", "B"]


def _whole_groups_right_or_wrong(n_groups: int = 10, per_group: int = 30) -> tuple[list[int], list[int], list[str]]:
    """Half the groups all right, half all wrong: correctness is constant within a group."""
    truth, preds, groups = [], [], []
    for g in range(n_groups):
        label = g % 2
        truth += [label] * per_group
        preds += [label if g < n_groups // 2 else 1 - label] * per_group
        groups += [f"case{g}"] * per_group
    return truth, preds, groups


def test_the_interval_is_over_groups_and_wider_than_over_images() -> None:
    truth, preds, groups = _whole_groups_right_or_wrong()
    by_group = group_bootstrap(truth, preds, groups, 2)
    by_image = group_bootstrap(truth, preds, [str(i) for i in range(len(truth))], 2)  # every image its own group
    width = {k: v[1] - v[0] for k, v in (("groups", by_group["image/acc"]), ("images", by_image["image/acc"]))}
    assert width["groups"] > 3 * width["images"]  # 10 effective samples, not 300: about sqrt(30) times wider
    assert by_group["image/acc"][0] < 0.5 < by_group["image/acc"][1]


def test_the_interval_holds_the_estimate_lies_in_0_1_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 200).tolist()
    preds = [t if rng.random() < 0.7 else (t + 1) % 3 for t in truth]
    groups = [f"g{i // 8}" for i in range(200)]
    ci = group_bootstrap(truth, preds, groups, 3, seed=1)
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (np.array(truth), np.array(preds)), 1)
    for metric, fn in (("image/acc", accuracy), ("image/f1_macro", macro_f1)):
        low, high = ci[metric]
        assert 0 <= low <= float(fn(cm)) <= high <= 1
    assert ci == group_bootstrap(truth, preds, groups, 3, seed=1)
    assert ci != group_bootstrap(truth, preds, groups, 3, seed=2)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_roc_auc_are_sklearns() -> None:
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(3)
    truth, preds = rng.integers(0, 3, 90), rng.integers(0, 4, 90) % 3
    truth[truth == 2] = 1  # class 2 absent from truth (predicted only): left out of the mean recall, as sklearn does
    cm = confusion_matrix(truth, preds, labels=[0, 1, 2])
    assert np.isclose(balanced_accuracy(cm), balanced_accuracy_score(truth, preds))
    binary = rng.integers(0, 2, 120)
    scores = np.round(rng.random(120) + 0.4 * binary, 1)  # rounded: ties between classes count half
    assert np.isclose(roc_auc(binary, scores), roc_auc_score(binary, scores))
    assert roc_auc([1, 1, 1], [0.2, 0.5, 0.9]) is None and group_bootstrap_auc([0, 0], [0.1, 0.2], ["a", "b"]) is None


def test_the_auc_interval_is_over_groups_holds_the_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    truth = np.repeat(rng.integers(0, 2, 20), 15)  # 20 groups of 15 images, one label a group
    scores = np.repeat(rng.random(20), 15) * 0.6 + 0.4 * truth + rng.normal(0, 0.02, 300)  # a group's scores alike
    groups = [f"case{i // 15}" for i in range(300)]
    by_group = group_bootstrap_auc(truth, scores, groups, seed=1)
    by_image = group_bootstrap_auc(truth, scores, [str(i) for i in range(300)], seed=1)
    assert by_group[0] <= roc_auc(truth, scores) <= by_group[1] <= 1
    assert by_group[1] - by_group[0] > 2 * (by_image[1] - by_image[0])  # 20 effective samples, not 300
    assert by_group == group_bootstrap_auc(truth, scores, groups, seed=1)


def test_macro_f1_of_a_confusion_matrix_is_sklearns() -> None:
    from sklearn.metrics import f1_score

    truth, preds = [0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2]
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (np.array(truth), np.array(preds)), 1)
    assert np.isclose(macro_f1(cm), f1_score(truth, preds, average="macro"))


def test_case_level_accuracy_by_majority_with_the_tie_rule() -> None:
    labels = [0] * 3 + [1] * 2 + [1] * 2 + [0] * 2
    preds = [0, 0, 1, 0, 1, 0, 0, 1, 0]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3],
                      [0.45, 0.55], [0.9, 0.1]])
    groups = ["x"] * 3 + ["y"] * 2 + ["z"] * 2 + ["w"] * 2
    # x: majority A (right); y: 1-1 tie, mean prob of B 0.625 > A 0.375 -> B (right); z: A (wrong);
    # w: 1-1 tie, mean prob of A 0.675 > B 0.325 -> A (right): the tie goes by probability, not by class order
    truth, called = case_calls(labels, preds, probs, groups, 2)  # groups in sorted order: w, x, y, z
    assert truth.tolist() == [0, 0, 1, 1] and called.tolist() == [0, 0, 1, 0]
    result = case_level(labels, preds, probs, groups, 2)
    assert (result["right"], result["groups"]) == (3, 4) and np.isclose(result["acc"], 3 / 4)
    assert 0 <= result["interval"][0] <= result["acc"] <= result["interval"][1] <= 1
    assert result["interval"][0] < result["interval"][1]  # 4 cases: a wide interval


def _report_rows(tmp_path: Path, grouped: bool = True) -> list[dict[str, Any]]:
    """8 cases of 3 small PNG images each in 4 folds; the last two cases all wrong (18/24 images right)."""
    rows = []
    rng = np.random.default_rng(0)
    for g in range(8):
        label = CLASSES[g % 2]
        for i in range(3):
            path = tmp_path / f"{label}-{g}-{i}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
            predicted = label if g < 6 else CLASSES[1 - g % 2]
            p = 0.8 if predicted == "A" else 0.2
            rows.append({"image": str(path), "fold": str(g % 4 + 1), "label": label, "predicted": predicted,
                         "patches": 4, "votes_A": 4 if predicted == "A" else 0, "votes_B": 0 if predicted == "A" else 4,
                         "prob_A": p, "prob_B": 1 - p, **({"group": f"case{g}"} if grouped else {})})
    return rows


def test_the_k_fold_report_gives_intervals_over_groups_and_case_level(tmp_path: Path) -> None:
    report = fold_report(_report_rows(tmp_path), CLASSES, tmp_path, {"aggregate": "vote"})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["groups"] == {"n": 8, "given": True, "per_fold": {"1": 2, "2": 2, "3": 2, "4": 2}}
    interval = saved["interval"]
    assert (interval["method"], interval["level"], interval["resamples"]) == ("bootstrap over groups", 0.95, 2000)
    low, high = interval["image/acc"]
    assert low < report["pooled"]["image/acc"] == 0.75 < high
    low, high = interval["image/f1_macro"]
    assert low < report["pooled"]["image/f1_macro"] < high
    assert {k: saved["case_level"][k] for k in ("acc", "right", "groups")} == {"acc": 0.75, "right": 6, "groups": 8}
    for baseline in saved["colour_baselines"].values():
        low, high = baseline["interval"]["image/acc"]
        assert 0 <= low <= baseline["pooled"]["image/acc"] <= high <= 1
    text = (tmp_path / "report.md").read_text()
    ci = interval["image/acc"]
    assert f"| image accuracy | 0.750 (18/24; 95% CI {ci[0]:.3f}–{ci[1]:.3f} over 8 groups) |" in text
    assert "| case-level accuracy (majority of a case's images) | 0.750 (6/8; 95% CI" in text
    assert "8 groups (patients)" in text and "Groups per fold: 1: 2, 2: 2, 3: 2, 4: 2." in text
    rows = _report_rows(tmp_path)
    auc = roc_auc_score([r["label"] == "B" for r in rows], [r["prob_B"] for r in rows])
    assert saved["roc_auc"]["positive"] == "B" and np.isclose(saved["roc_auc"]["value"], auc)
    low, high = saved["roc_auc"]["interval"]
    assert f"| image ROC AUC (B positive) | {auc:.3f} (95% CI {low:.3f}–{high:.3f} over 8 groups) |" in text
    balanced = report["pooled"]["image/balanced_acc"]
    assert np.isclose(balanced, balanced_accuracy_score([r["label"] for r in rows], [r["predicted"] for r in rows]))
    assert f"| image balanced accuracy | {balanced:.3f} (95% CI" in text


def test_rows_without_groups_take_each_image_as_its_own_group_and_say_so(tmp_path: Path) -> None:
    fold_report(_report_rows(tmp_path, grouped=False), CLASSES, tmp_path, {"aggregate": "vote"})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["groups"]["n"] == 24 and not saved["groups"]["given"] and saved["case_level"]["groups"] == 24
    assert "each image is taken as its own patient" in (tmp_path / "report.md").read_text()


def test_a_perfect_score_gets_the_exact_interval_over_cases_not_a_bootstrap_of_one_point(tmp_path: Path) -> None:
    assert np.isclose(clopper_pearson(10, 10)[0], 0.025 ** (1 / 10))  # all right: (alpha/2)^(1/n), closed form
    assert np.isclose(clopper_pearson(0, 10)[1], 1 - 0.025 ** (1 / 10)) and clopper_pearson(5, 10)[0] < 0.5
    rows = [{**r, "predicted": r["label"], "prob_A": float(r["label"] == "A"), "prob_B": float(r["label"] == "B")}
            for r in _report_rows(tmp_path)]
    report = fold_report(rows, CLASSES, tmp_path, {"aggregate": "vote"})
    assert report["interval"]["image/acc"] == [1.0, 1.0]  # every resample of 8 all-right cases is all right
    low = clopper_pearson(8, 8)[0]
    assert f"exact (Clopper-Pearson) 95% interval of 8/8 cases right is {low:.3f}–1.000" in \
        (tmp_path / "report.md").read_text()
    assert f"[95% CI {low:.2f}, 1.00, exact over 8 groups]" in headline(report)  # the line a sweep prints last
