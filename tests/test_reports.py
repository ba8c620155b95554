"""Tests for histoflow.evaluation.figures: confusion CSV/PNG, fold summaries and training curves."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from conftest import plotted_lines

from histoflow.data.folds import BLOCKS, CASES, LOCO, PER_IMAGE, protocol_of
from histoflow.evaluation.figures import (
    confusion_figure,
    plot_training_curves,
    save_confusion_matrix,
)
from histoflow.evaluation.tables import (
    folds_markdown,
    read_confusion_csv,
    summarize_folds,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["CLL", "FL", "MCL"]
CM = np.array([[50, 3, 1], [4, 20, 0], [0, 2, 5]])


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 200 <= height <= 3000 and 200 <= width <= 3000


def test_confusion_csv_round_trip_and_png(tmp_path: Path) -> None:
    csv_path, png_path = save_confusion_matrix(CM, CLASSES, tmp_path / "nested" / "fold0_cm", title="fold 0")
    assert csv_path == tmp_path / "nested" / "fold0_cm.csv"
    assert png_path == tmp_path / "nested" / "fold0_cm.png"
    assert csv_path.read_text().splitlines()[0] == "true\\predicted,CLL,FL,MCL"
    cm, classes = read_confusion_csv(csv_path)
    assert classes == CLASSES
    assert cm.dtype.kind == "i"
    np.testing.assert_array_equal(cm, CM)
    assert_valid_png(png_path)
    assert png_path.stat().st_size < 200_000


def test_confusion_csv_round_trip_float_exact(tmp_path: Path) -> None:
    cm = np.array([[0.1, 1 / 3], [2.5, 7.0]])
    csv_path, _ = save_confusion_matrix(cm, ["a", "b"], tmp_path / "cm")
    back, classes = read_confusion_csv(csv_path)
    assert classes == ["a", "b"]
    assert np.array_equal(back, cm)


def test_read_confusion_csv_pools_folds(tmp_path: Path) -> None:
    save_confusion_matrix(CM, CLASSES, tmp_path / "f0")
    save_confusion_matrix(2 * CM, CLASSES, tmp_path / "f1")
    pooled = sum(read_confusion_csv(tmp_path / f"f{k}.csv")[0] for k in range(2))
    np.testing.assert_array_equal(pooled, 3 * CM)


def test_confusion_figure_labels_and_accuracy() -> None:
    fig = confusion_figure(CM, CLASSES, title="test")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted"
    assert ax.get_ylabel() == "true"
    assert f"{75 / 85:.3f}" in ax.get_title()
    # Every cell carries its count, and the recall of each class is on its row label.
    texts = [t.get_text() for t in ax.texts]
    assert sorted(texts) == sorted(str(v) for v in CM.ravel())
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    assert "93%" in ylabels[0] and "83%" in ylabels[1] and "71%" in ylabels[2]


def test_confusion_figure_empty_class_and_bad_shape() -> None:
    cm = np.array([[3, 1], [0, 0]])
    fig = confusion_figure(cm, ["a", "b"])
    assert "n/a" in fig.axes[0].get_yticklabels()[1].get_text()
    with pytest.raises(ValueError):
        confusion_figure(cm, ["a", "b", "c"])


def test_summarize_folds_matches_numpy() -> None:
    per_fold = {
        "fold0": {"acc": 0.8, "f1": 0.7},
        "fold1": {"acc": 0.9, "f1": 0.6},
        "fold2": {"acc": 0.75, "f1": 0.65},
    }
    summary = summarize_folds(per_fold)
    acc = np.array([0.8, 0.9, 0.75])
    assert summary["acc"]["mean"] == pytest.approx(acc.mean())
    assert summary["acc"]["sd"] == pytest.approx(acc.std(ddof=1))
    assert summary["acc"]["min"] == 0.75 and summary["acc"]["max"] == 0.9
    assert summary["acc"]["n"] == 3
    assert summary["f1"]["sd"] == pytest.approx(np.std([0.7, 0.6, 0.65], ddof=1))


def test_summarize_single_fold_has_zero_sd() -> None:
    summary = summarize_folds({"fold0": {"acc": 0.5}})
    assert summary["acc"] == {"mean": 0.5, "sd": 0.0, "min": 0.5, "max": 0.5, "n": 1}


def test_folds_markdown_rows() -> None:
    per_fold = {"fold0": {"acc": 0.8, "f1": 0.7}, "fold1": {"acc": 0.9, "f1": 0.6}}
    text = folds_markdown(per_fold, summarize_folds(per_fold))
    lines = text.strip().splitlines()
    assert lines[0] == "| fold | acc | f1 |"
    body = lines[2:]
    assert len(body) == len(per_fold) + 1
    assert body[0] == "| fold0 | 0.800 | 0.700 |"
    assert body[-1].startswith("| mean ± sd | 0.850 ± 0.071 |")
    only_f1 = folds_markdown(per_fold, summarize_folds(per_fold), metrics=["f1"])
    assert "acc" not in only_f1


def write_metrics_csv(path: Path, header: list[str], rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def test_plot_training_curves_three_epochs(tmp_path: Path, saved_figures: list) -> None:
    """Every curve, from the columns PatchClassifier logs (sparse like CSVLogger: step rows, one validation row and
    one epoch-aggregate row an epoch): each plotted series is its column's value at every epoch, the epoch
    aggregate of the training loss rather than its per-step values."""
    header = ["epoch", "step", "train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc_micro",
              "val/acc_macro", "val/f1_macro"]
    rows: list[dict[str, object]] = []
    step = 0
    for epoch in range(3):
        for _ in range(4):
            rows.append({"epoch": epoch, "step": step, "train/loss_step": 1.0 / (step + 1)})
            step += 1
        rows.append({"epoch": epoch, "step": step - 1, "val/loss": 0.9 - 0.1 * epoch, "val/acc_micro": 0.6,
                     "val/acc_macro": 0.6 + 0.1 * epoch, "val/f1_macro": 0.5 + 0.1 * epoch})
        rows.append({"epoch": epoch, "step": step - 1, "train/loss_epoch": 0.8 - 0.1 * epoch, "train/acc": 0.5})
    csv_path = write_metrics_csv(tmp_path / "metrics.csv", header, rows)
    out = plot_training_curves(csv_path, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert_valid_png(out)
    (figure,) = saved_figures
    epochs = [0.0, 1.0, 2.0]
    expected = {
        "loss": {"train loss": [0.8, 0.7, 0.6], "val loss": [0.9, 0.8, 0.7]},
        "accuracy / F1": {"train acc": [0.5] * 3, "val acc (micro)": [0.6] * 3, "val acc (macro)": [0.6, 0.7, 0.8],
                          "val F1 (macro)": [0.5, 0.6, 0.7]},
    }
    drawn = plotted_lines(figure)
    assert list(drawn) == list(expected)  # the two panels, in order
    for panel, curves in expected.items():
        assert list(drawn[panel]) == list(curves)  # each curve drawn, in order, and no other
        for label, values in curves.items():
            xs, ys = drawn[panel][label]
            assert xs == epochs and ys == pytest.approx(values), (panel, label)


def test_plot_training_curves_uses_last_value_per_epoch(tmp_path: Path, saved_figures: list) -> None:
    """Without an epoch aggregate the training loss is the last step value logged in each epoch; an empty cell
    is not a value."""
    rows = [
        {"epoch": "0", "step": "0", "train/loss_step": "3.0"},
        {"epoch": "0", "step": "1", "train/loss_step": "2.0"},
        {"epoch": "0", "step": "1", "train/loss_step": ""},
        {"epoch": "1", "step": "2", "train/loss_step": "1.0"},
    ]
    csv_path = write_metrics_csv(tmp_path / "metrics.csv", ["epoch", "step", "train/loss_step"], rows)
    plot_training_curves(csv_path, tmp_path / "curves.png")
    (figure,) = saved_figures
    assert plotted_lines(figure) == {"loss": {"train loss": ([0.0, 1.0], [2.0, 1.0])}, "accuracy / F1": {}}


def test_plot_training_curves_single_epoch_without_val(tmp_path: Path, saved_figures: list) -> None:
    rows = [{"epoch": 0, "step": s, "train/loss_step": 1.0 - 0.1 * s} for s in range(3)]
    csv_path = write_metrics_csv(tmp_path / "metrics.csv", ["epoch", "step", "train/loss_step"], rows)
    out = plot_training_curves(csv_path, tmp_path / "curves.png")
    assert_valid_png(out)
    (figure,) = saved_figures
    assert plotted_lines(figure) == {"loss": {"train loss": ([0.0], [pytest.approx(0.8)])}, "accuracy / F1": {}}
    (line,) = figure.axes[0].lines
    assert line.get_marker() == "o"  # a one-point series stays visible
    assert [t.get_text() for t in figure.axes[1].texts] == ["no data"]


def test_plot_training_curves_header_only(tmp_path: Path, saved_figures: list) -> None:
    csv_path = write_metrics_csv(tmp_path / "metrics.csv", ["epoch", "step"], [])
    assert_valid_png(plot_training_curves(csv_path, tmp_path / "curves.png"))
    (figure,) = saved_figures
    assert plotted_lines(figure) == {"loss": {}, "accuracy / F1": {}}
    assert [[t.get_text() for t in ax.texts] for ax in figure.axes] == [["no data"], ["no data"]]


def test_the_protocol_is_read_from_the_data_config_and_grouped_only_where_a_group_joins_images() -> None:
    joined = ["CLL/0", "CLL/0", "FL/1"]
    assert protocol_of({"groups": "cases.csv"}, ["a.png", "b.png"]) == PER_IMAGE  # a group per image: per image
    assert protocol_of({"groups": "cases.csv"}, joined) == CASES
    assert protocol_of({"labels": "csv", "csv": "cases.csv"}, joined) == CASES
    assert protocol_of({"groups": "cases.csv", "split": {"kind": "leave_one_group_out"}}, joined) == LOCO
    assert protocol_of({"group_regex": r"-(\d+)\.", "group_block": 8}, joined) == BLOCKS
