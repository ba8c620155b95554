"""Prediction: stub-model votes, the grid, the k-fold report of a real tiny multirun, bad inputs, unsafe checkpoints.

The k-fold tests train five tiny folds once (python train.py -m, ~30 s) and predict with predict.py.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import results
import torch
from conftest import CLASSES, env_without_wandb_account, make_images, plotted_lines
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from histoflow.data.dataset import PreparedDataset
from histoflow.data.manifest import read_manifest
from histoflow.data.patches import PatchConfig
from histoflow.data.transforms import PatchTransform
from histoflow.deployment.deploy import predict
from histoflow.evaluation.tables import read_confusion_csv
from histoflow.inference.fold_models import (
    check_compatible,
    find_checkpoints,
    load_fold_model,
    preprocessing_of,
)
from histoflow.inference.held_out import BadImagesError
from histoflow.inference.sweep_report import ImageReport, headline, write_image_report
from histoflow.inference.sweep_report import predict_config as sweep_predict_config
from histoflow.inference.voting import (
    VIEWS,
    ImagePatches,
    by_votes,
    grid_config,
    predict_images,
    tta_views,
)
from histoflow.inference.window_inputs import view_windows
from histoflow.training.checkpoints import CheckpointError, load_classifier

REPO = Path(__file__).resolve().parents[1]
COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # the stub net's class of a pure-colour patch


class ChannelMeans(nn.Module):
    """Stub net: logits are the patch's channel means times 10, so a red patch is class 0, green 1, blue 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 10


def painted(classes_by_window: list[list[int]], scale: list[list[float]] | None = None) -> np.ndarray:
    """A 100 x 68 image (a 2 x 3 grid of 36-px windows, stride 32) whose window (r, c) has the centre crop
    (32 px from offset 2, where the stub looks) painted in its class's colour, times scale."""
    image = np.full((68, 100, 3), 128, np.uint8)
    for r, row in enumerate(classes_by_window):
        for c, k in enumerate(row):
            s = scale[r][c] if scale else 1.0
            image[2 + 32 * r:34 + 32 * r, 2 + 32 * c:34 + 32 * c] = np.array(COLOURS[k]) * s
    return image


def plain_transform() -> PatchTransform:
    return PatchTransform(32, {"mean_image": np.zeros((36, 36, 3))}, normalize="none", train=False)


# --- voting on a stub model ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,workers", [(4, 0), (512, 1), (4, 2)])
def test_votes_of_a_stub_model(tmp_path: Path, batch_size: int, workers: int) -> None:
    layouts = {"a.png": [[0, 1, 1], [2, 1, 2]], "b.png": [[0, 0, 2], [0, 0, 2]]}
    for name, layout in layouts.items():
        Image.fromarray(painted(layout)).save(tmp_path / name)
    paths = [tmp_path / n for n in layouts]
    # batch 4 packs patches of both images into one batch: the votes must still go to the right image
    votes = predict_images(paths, [(ChannelMeans(), plain_transform())], 3, grid_config(36, 32),
                           batch_size=batch_size, num_workers=workers, progress=False)
    assert votes.votes.tolist() == [[1, 3, 2], [4, 0, 2]]
    assert votes.patches.tolist() == [6, 6] and not votes.problems
    assert votes.labels("vote").tolist() == [1, 0]
    assert np.allclose(votes.mean_prob().sum(axis=1), 1.0)


def test_a_bug_while_cutting_an_image_fails_the_run_not_the_image(tmp_path: Path, monkeypatch) -> None:
    """Only what a bad image raises makes it a per-image problem: a code bug must not pass as one (and, with
    on_bad_image=skip, end in an empty predictions.csv with exit 0)."""
    from histoflow.inference import voting

    Image.fromarray(painted([[0, 1, 1], [2, 1, 2]])).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")  # smaller than a window
    patches = voting.ImagePatches([tmp_path / "a.png", tmp_path / "tiny.png"], grid_config(36, 32))
    assert patches[1].problem.kind == "too-small" and "smaller than the 36-px window" in patches[1].problem.detail
    monkeypatch.setattr(voting, "extract_patches", lambda *a: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        patches[0]


class Scaled(nn.Module):
    """Stub net: ChannelMeans' logits times a factor (a surer or a less sure fold model)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ChannelMeans()(x) * self.factor


def test_fold_ensemble_averages_the_models_probabilities_exactly(tmp_path: Path) -> None:
    """Several fold models on new images: each patch's probability is the mean of the models' softmaxes."""
    Image.fromarray(painted([[0, 1, 1], [2, 1, 2]], [[0.3, 0.5, 1.0], [0.2, 0.4, 0.6]])).save(tmp_path / "a.png")
    factors = [0.05, 0.3, 1.0]
    run = lambda models: predict_images([tmp_path / "a.png"], models, 3, grid_config(36, 32),  # noqa: E731
                                        num_workers=0, progress=False)
    alone = [run([(Scaled(f), plain_transform())]) for f in factors]
    together = run([(Scaled(f), plain_transform()) for f in factors])
    expected = np.mean([v.mean_prob() for v in alone], axis=0)
    np.testing.assert_allclose(together.mean_prob(), expected, rtol=1e-6)
    assert not np.allclose(alone[0].mean_prob(), alone[2].mean_prob())  # the models do differ


def test_ties_go_to_the_higher_summed_probability_then_to_class_order(tmp_path: Path) -> None:
    # 3 votes each for CLL and FL; the FL patches are painted brighter, so the net is surer of them
    layout = [[0, 0, 0], [1, 1, 1]]
    Image.fromarray(painted(layout, [[0.5] * 3, [1.0] * 3])).save(tmp_path / "tie.png")
    votes = predict_images([tmp_path / "tie.png"], [(ChannelMeans(), plain_transform())], 3, grid_config(36, 32),
                           num_workers=0, progress=False)
    assert votes.votes.tolist() == [[3, 3, 0]]
    assert votes.labels("vote").tolist() == [1] and votes.labels("mean").tolist() == [1]
    # the rule itself: most votes; among tied classes the higher summed probability; then the first class
    assert by_votes(np.array([[3, 3, 0]]), np.array([[2.0, 1.0, 3.0]])).tolist() == [0]
    assert by_votes(np.array([[3, 3, 0]]), np.array([[1.5, 1.5, 3.0]])).tolist() == [0]
    assert by_votes(np.array([[2, 3, 1]]), np.array([[5.0, 0.1, 0.0]])).tolist() == [1]


def test_grid_positions_for_a_known_image_size(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((68, 100, 3), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((312, 417, 3), np.uint8)).save(tmp_path / "lymphoma-size.png")
    data = ImagePatches([tmp_path / "small.png", tmp_path / "lymphoma-size.png"], grid_config(36, 32))
    small, large = data[0], data[1]
    assert small.origins.tolist() == [[0, 0], [32, 0], [64, 0], [0, 32], [32, 32], [64, 32]]
    assert tuple(small.x.shape) == (1, 6, 36, 36, 3)  # stain steps, patches, the uint8 window as cut
    assert small.x.dtype == torch.uint8
    xs, ys = large.origins[:, 0], large.origins[:, 1]
    assert len(large.origins) == 12 * 9 == PatchConfig(36, 32, [0]).count(312, 417)
    assert sorted(set(xs.tolist())) == list(range(0, 353, 32)) and sorted(set(ys.tolist())) == list(range(0, 257, 32))
    assert int(xs.max()) + 36 <= 417 and int(ys.max()) + 36 <= 312  # every window lies inside the image


def test_tta_views_are_the_flips_and_rotations_of_each_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (68, 100, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    item = ImagePatches([tmp_path / "noise.png"], grid_config(36, 32))[0]
    views = view_windows(item.x[0], tta_views(True)).unflatten(0, (-1, 8))[0]  # the 8 views of the first window
    assert len(views) == len(VIEWS) == 8
    assert len({v.numpy().tobytes() for v in views}) == 8  # all distinct
    assert torch.equal(views[0], item.x[0, 0])
    assert torch.equal(views[1], torch.rot90(views[0], 1, dims=(0, 1)))  # rot90: a quarter turn, counter-clockwise
    assert torch.equal(views[4], views[0].flip(1))  # flip: mirrored left to right
    with pytest.raises(ValueError, match="unknown view"):
        tta_views(["identity", "rot45"])


# --- a real tiny five-fold run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 images per class, 100 x 68 px (6 windows each), class told apart by colour."""
    base = tmp_path_factory.mktemp("tiny")
    make_images(base / "images", per_class=10, size=(100, 68), pixels="tint", digits=3)
    return base


def run_script(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{script} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def train_tiny_folds(tiny: Path, sweep: Path, *overrides: str) -> Path:
    """Five folds trained for two batches each by `python train.py -m fold=1,2,3,4,5` into sweep."""
    run_script("train.py", ["-m", "fold=1,2,3,4,5", f"data.root={tiny / 'images'}", f"paths.data_dir={tiny / 'work'}",
                            f"paths.log_dir={tiny / 'logs'}", f"paths.cache_dir={tiny / 'cache'}",
                            "data.shards.samples_per_shard=40", "data.shards.workers=1", "++data.loader.batch_size=16",
                            "++data.loader.num_workers=0", "++data.loader.shuffle_buffer=64", "trainer.max_epochs=1",
                            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false", "logger=csv",
                            f"hydra.sweep.dir={sweep}", *overrides], env_without_wandb_account(tiny))
    return sweep


@pytest.fixture(scope="module")
def multirun(tiny: Path) -> Path:
    return train_tiny_folds(tiny, tiny / "multirun")


def predict_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """conf/predict.yaml with overrides, as predict.py would get it, writing to output_dir."""
    return sweep_predict_config([*overrides, "progress=false", "num_workers=0"], output_dir)


@pytest.fixture(scope="module")
def five_fold_report(multirun: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python predict.py ckpt_path=<multirun>`: the k-fold report's folder."""
    out = tmp_path_factory.mktemp("predict") / "report"
    run_script("predict.py", [f"ckpt_path={multirun}", f"hydra.run.dir={out}", "wandb.enabled=true"],
               env_without_wandb_account(out.parent))
    return out


def test_five_fold_report_each_image_by_the_model_that_held_it_out(five_fold_report: Path, tiny: Path) -> None:
    out = five_fold_report
    report = json.loads((out / "report.json").read_text())
    cm, classes = read_confusion_csv(out / "confusion_images.csv")
    assert classes == CLASSES and cm.sum() == 30 == report["images"]
    assert (out / "confusion_images.png").is_file() and (out / "report.md").is_file()
    assert set(report["per_fold"]) == {f"fold {k}" for k in range(1, 6)}
    assert report["summary"]["image/acc"]["n"] == 5.0
    assert np.isclose(report["pooled"]["image/acc"], np.trace(cm) / cm.sum())
    assert len(report["misclassified"]) == cm.sum() - np.trace(cm)
    assert "mean ± sd" in (out / "report.md").read_text()
    # calibration and the colour-only baselines on the same folds (the tiny classes differ by tint alone)
    assert 0.0 <= report["calibration"]["ece"] <= 1.0 and (out / "reliability_images.png").is_file()
    assert sum(b["count"] for b in report["calibration"]["bins"]) == 30
    assert set(report["colour_baselines"]) == {"logistic", "forest"}
    for baseline in report["colour_baselines"].values():
        assert baseline["pooled"]["image/acc"] == 1.0
        assert list(baseline["per_fold"]) == list(report["per_fold"])  # the same folds, in the same order
    assert "random forest" in (out / "report.md").read_text()
    # every manifest image once, predicted by the checkpoint trained with its fold held out
    (manifest_path,) = (tiny / "work" / "prepared").glob("*/manifest.csv")
    fold_of = {r["image"]: r["fold"] for r in read_manifest(manifest_path)}
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    root = tiny / "images"
    predicted = [str(Path(r["image"]).relative_to(root)) for r in rows]
    assert sorted(predicted) == sorted(fold_of)
    assert (out / "problems.csv").read_text().splitlines() == ["path,kind,detail,action"]  # checked, nothing wrong
    for row, image in zip(rows, predicted):
        trained = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
        assert row["fold"] == fold_of[image] == str(trained["fold"])
        assert int(row["patches"]) == 6 == sum(int(row[f"votes_{c}"]) for c in CLASSES)
        first, second = sorted((int(row[f"votes_{c}"]) for c in CLASSES), reverse=True)[:2]
        assert float(row["vote_margin"]) == pytest.approx((first - second) / 6, abs=1e-6)
        assert float(row["confidence"]) == pytest.approx(float(row[f"prob_{row['predicted']}"]), abs=1e-6)
    assert list((out / "wandb").glob("offline-run-*")), "W&B did not log offline"


def test_a_sweep_under_brackets_and_accents_gets_its_image_report(multirun: Path, tmp_path: Path) -> None:
    """Issue 29.1: a multirun under `runs (copy) [1]/josé-...` once got no report (its path reached Hydra's override
    parser unquoted) while the command exited 0."""
    sweep = tmp_path / "runs (copy) [1]" / "josé-multirun"
    shutil.copytree(multirun, sweep, ignore=shutil.ignore_patterns("image_report"))
    report = write_image_report(sweep, ["progress=false", "num_workers=0"])
    assert report == sweep.resolve() / "image_report" / "report.md" and report.is_file()
    assert json.loads((report.parent / "report.json").read_text())["images"] == 30


def test_a_failed_image_report_fails_the_multirun(multirun: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Hydra turns a callback's exception into a warning: the report's failure must still end the command non-zero,
    with the command that writes it by hand."""
    sweep = tmp_path / "sweep"
    shutil.copytree(multirun, sweep, ignore=shutil.ignore_patterns("image_report"))

    def broken(cfg: DictConfig) -> None:
        raise RuntimeError("the disk went away")

    monkeypatch.setattr("histoflow.inference.sweep_report.predict", broken)
    with pytest.raises(SystemExit) as exit_:
        ImageReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert exit_.value.code == 1
    assert "the disk went away" in caplog.text and f"histoflow predict 'ckpt_path='\"'\"'{sweep}" in caplog.text


def test_the_multirun_writes_the_same_image_report_as_predict(five_fold_report: Path, multirun: Path) -> None:
    """train.py -m fold=1,...,5 ends with predict.py's k-fold report in <multirun>/image_report/."""
    made = multirun / "image_report"
    for name in ("predictions.csv", "confusion_images.csv"):
        assert (made / name).read_text() == (five_fold_report / name).read_text(), name
    ours, theirs = (json.loads((d / "report.json").read_text()) for d in (made, five_fold_report))
    for key in ("per_fold", "summary", "pooled", "interval", "case_level", "groups", "colour_baselines"):
        assert ours[key] == theirs[key], key
    assert ours["settings"]["ckpt_path"] == theirs["settings"]["ckpt_path"] == str(multirun)
    line = headline(ours)  # what the sweep prints last
    assert line.startswith(f"image accuracy {ours['pooled']['image/acc']:.3f} pooled over 30 images")
    assert "each its own group" in line and "case-level" not in line  # no patients were given


def test_a_run_is_recorded_from_the_report_its_multirun_wrote(multirun: Path, tmp_path: Path) -> None:
    """<multirun>/image_report/ records like a predict.py report, with the training command alone."""
    record = results.record_run(f"tiny recipe={multirun / 'image_report'}", tmp_path / "figures", tmp_path)
    assert [c.split()[:3] for c in record["commands"]] == [["python", "train.py", "-m"]]
    assert record["images"] == 30 and len(record["image_acc"]) == 5 and record["predict_s"] is None
    assert record["group_table"] is None and record["group_block"] is None  # folds per image: no table, no blocks
    assert all((tmp_path / f).is_file() for f in record["figures"].values())
    with pytest.raises(SystemExit, match=f"at most {results.MAX_LABEL} characters"):  # a label, not a description
        results.record_run(f"{'x' * (results.MAX_LABEL + 1)}={multirun / 'image_report'}", tmp_path, tmp_path)


def test_results_section_is_rendered_from_the_recorded_runs(five_fold_report: Path, multirun: Path,
                                                             tmp_path: Path, saved_figures: list) -> None:
    """The full section goes to docs/results.md (beside the record), the headline table to the README; both are
    re-rendered byte for byte from the record alone."""
    readme, record, docs = tmp_path / "README.md", tmp_path / "docs" / "results.json", tmp_path / "docs"
    page, runs_dir = docs / "results.md", docs / "figures" / results.RUNS  # the default page: beside the record
    readme.write_text(f"# x\n\n## Results\n\n{results.BEGIN}\nold text\n{results.END}\n\n## After\n")
    options = ["--readme", str(readme), "--figures", str(docs / "figures"), "--record", str(record)]
    results.main([f"tutorial: the tutorial's recipe, seed=0={five_fold_report}", *options])  # label: description
    text, head = page.read_text(), readme.read_text()
    report = json.loads((five_fold_report / "report.json").read_text())
    acc = report["summary"]["image/acc"]
    assert text.startswith(f"# Results\n\n{results.BEGIN}") and text.endswith(f"{results.END}\n")  # created
    assert "old text" not in head and head.startswith("# x\n\n## Results\n\n") and head.endswith("\n\n## After\n")
    assert "](docs/results.md)" in head and "| tutorial |" not in head  # no case-fold run yet: an empty headline
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("| tutorial | "))  # the leaky-protocol recipe table
    header = lines[lines.index(row) - 2]
    assert row.count("|") == header.count("|")  # as many cells as the header
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["per-image folds: image acc"] == f"{acc['mean']:.3f} ± {acc['sd']:.3f}"
    assert cells["block folds: image acc"] == "–"  # the tiny sweep has folds per image only
    assert cells["colour only, block: logistic / forest"] == "–"
    assert "- **tutorial**: the tutorial's recipe, seed=0" in lines  # the description, under the table
    run = next(line for line in lines if line.startswith("| tutorial | per-image folds |"))  # the run table
    header = lines[lines.index(run) - 2]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in run.split("|")]))
    assert float(cells["prepare, s"]) > 0 and float(cells["report, s"]) > 0
    assert [float(cells[f"fold {k}"]) for k in range(1, 6)] == pytest.approx(
        [report["per_fold"][f"fold {k}"]["image/acc"] for k in range(1, 6)], abs=5e-4)
    assert "python train.py -m fold=1,2,3,4,5" in text and f"python predict.py ckpt_path={multirun}" in text
    figure = runs_dir / "tutorial-per-image-folds-confusion.png"  # short: the label and the protocol
    assert figure.read_bytes() == (five_fold_report / "confusion_images.png").read_bytes()
    assert "](figures/runs/tutorial-per-image-folds-confusion.png)" in text  # relative to the page
    (run,) = json.loads(record.read_text())["runs"]
    assert f"Machine: {run['machine']}." in text and f"{os.cpu_count()} CPU cores" in run["machine"]  # from the record
    assert run["images_per_class"] == dict(zip(report["classes"], np.sum(report["confusion_images"], 1).tolist()))

    results.main([f"tutorial={five_fold_report}", *options])  # the same recipe and protocol again: replaced,
    # its description kept
    assert page.read_text() == text and readme.read_text() == head
    assert len(json.loads(record.read_text())["runs"]) == 1
    results.main([f"another recipe, seed=1={five_fold_report}", *options])  # a new recipe, a label holding =: added
    assert len(json.loads(record.read_text())["runs"]) == 2
    table = [line.split("|")[1].strip() for line in page.read_text().splitlines() if line.startswith("| ")]
    assert table.index("tutorial") < table.index("another recipe, seed=1")
    rendered, rendered_head = page.read_text(), readme.read_text()
    page.write_text(text.replace(results.END, f"hand-edited\n{results.END}") + "\nkept by hand\n")
    readme.write_text(head.replace(results.END, f"hand-edited\n{results.END}"))
    results.main(options)  # from the record alone (the output folders need not exist any more)
    assert page.read_text() == rendered + "\nkept by hand\n" and readme.read_text() == rendered_head
    page.write_text(rendered)
    assert (runs_dir / "another-recipe-seed-1-per-image-folds-confusion.png").is_file()
    results.main(["--drop", "another recipe, seed=1", *options])  # forgotten, its figures deleted
    assert not (runs_dir / "another-recipe-seed-1-per-image-folds-confusion.png").exists()
    assert page.read_text() == text and readme.read_text() == head
    assert len(json.loads(record.read_text())["runs"]) == 1

    # the same run as if made under case folds, twice: the headline is the flagged recipe's row, first protocol
    runs = json.loads(record.read_text())["runs"]
    cased = {**runs[0], "protocol": "case folds", "group_table": "patients.csv",
             "images_per_class": {"CLL": 5, "FL": 15, "MCL": 10}}  # FL the largest class: half the images
    record.write_text(json.dumps({"runs": [*runs, {**cased, "headline": True},
                                           {**cased, "recipe": "not flagged", "pooled_acc": 0.25}]}))
    results.main(options)
    head, text = readme.read_text(), page.read_text()
    # the overview: each case-fold recipe's pooled accuracy, top down, the colour forest beside it, chance and the
    # majority class
    overview = f"figures/{results.OVERVIEW}"
    assert f"]({overview})" in text and f"](docs/{overview})" in head and (docs / overview).exists()
    (drawn,) = plotted_lines(saved_figures[-1]).values()
    forest = report["colour_baselines"]["forest"]["pooled"]["image/acc"]
    assert drawn["value [95% interval]"] == ([report["pooled"]["image/acc"], 0.25], [1.0, 0.0])
    assert next(v for k, v in drawn.items() if k.startswith("colour only")) == ([forest, forest], [1.0, 0.0])
    assert drawn["chance (1 in 3)"][0] == [1 / 3, 1 / 3] and drawn["majority class (FL, 0.50)"][0] == [0.5, 0.5]
    assert "| not flagged | **" in text and "| not flagged |" not in head  # the page has every case-fold recipe
    forest = report["colour_baselines"]["forest"]
    forest_cell = (f"{forest['pooled']['image/acc']:.2f} [{forest['interval']['image/acc'][0]:.2f}, "
                   f"{forest['interval']['image/acc'][1]:.2f}]")
    tables = {}
    for name, lines in (("head", head.splitlines()), ("page", text.splitlines())):
        row = next(line for line in lines if line.startswith("| tutorial | **"))
        header = lines[lines.index(row) - 2]
        cells = tables[name] = dict(zip([c.strip() for c in header.split("|")][1:-1],
                                        [c.strip() for c in row.split("|")][1:-1]))
        assert list(cells)[:3] == ["recipe", "pooled [95% CI over cases]", "image acc, mean ± sd over folds"]
        low, high = report["interval"]["image/acc"]
        assert cells["pooled [95% CI over cases]"] == f"**{report['pooled']['image/acc']:.3f}** [{low:.2f}, {high:.2f}]"
        assert cells["case-level acc"].startswith(f"{report['case_level']['acc']:.2f} (")
    assert len(tables["head"]) <= 6 and tables["head"]["colour only (forest), pooled [CI]"] == forest_cell
    assert tables["page"]["per-image folds (leaky)"] == f"{acc['mean']:.3f} ± {acc['sd']:.3f}"
    assert tables["page"]["colour only: logistic / forest, pooled [CI]"].endswith(forest_cell)
    assert "- **tutorial**: the tutorial's recipe, seed=0" in page.read_text().splitlines()  # described on the page
    assert "- **tutorial**" not in head  # not in the README, which stays short
    assert f"all {report['images']} images" in head and f"over the {report['case_level']['groups']} cases" in head
    assert "5 folds, all" in head and "No case (patient) of `patients.csv`" in text  # the folds and table recorded
    flagged = {"recipe": "tutorial", "protocol": "case folds", "acc": 0, "headline": True}
    rerun = {"recipe": "tutorial", "protocol": "case folds", "acc": 1}  # a new run of it: still in the headline
    assert results.add_record([flagged], rerun) == [{**rerun, "headline": True}]
    records = json.loads(record.read_text())["runs"]
    for r in records:
        r.pop("headline", None)
    record.write_text(json.dumps({"runs": records}))
    results.main(options)  # none flagged: every case-fold recipe heads the README
    assert "| not flagged | **" in readme.read_text() and "| tutorial | **" in readme.read_text()


def test_k_fold_report_of_an_ensemble_averages_each_folds_models(multirun: Path, tiny: Path, tmp_path: Path) -> None:
    """ckpt_path=[a,b]: each image by the models of both sweeps that held its fold out, probabilities averaged."""
    reseeded = train_tiny_folds(tiny, tmp_path / "seed1", "seed=1")
    for name, ckpt_path in [("a", str(multirun)), ("b", str(reseeded)), ("ab", f"[{multirun},{reseeded}]")]:
        predict(predict_config([f"ckpt_path={ckpt_path}"], tmp_path / name))
    rows = {}
    for name in ("a", "b", "ab"):
        with (tmp_path / name / "predictions.csv").open(newline="") as handle:
            rows[name] = {r["image"]: r for r in csv.DictReader(handle)}
    assert set(rows["ab"]) == set(rows["a"]) == set(rows["b"]) and len(rows["ab"]) == 30
    assert any(rows["a"][i]["prob_CLL"] != rows["b"][i]["prob_CLL"] for i in rows["a"])  # two different ensembles
    for image, row in rows["ab"].items():
        for c in CLASSES:  # the mean over patches of the nets' mean is the mean of the nets' image means
            assert float(row[f"prob_{c}"]) == pytest.approx(
                (float(rows["a"][image][f"prob_{c}"]) + float(rows["b"][image][f"prob_{c}"])) / 2, abs=2e-6)
        used = row["checkpoint"].split(";")
        assert used == [rows["a"][image]["checkpoint"], rows["b"][image]["checkpoint"]]
    report = json.loads((tmp_path / "ab" / "report.json").read_text())
    assert report["settings"]["ckpt_path"] == [str(multirun), str(reseeded)]
    assert "by the 2 models (probabilities averaged) of the fold" in (tmp_path / "ab" / "report.md").read_text()
    record = results.record_run(f"two seeds={tmp_path / 'ab'}", tmp_path / "docs", tmp_path)
    assert len(record["train_minutes"]) == 10  # the training time of both sweeps
    assert [c.split(" ")[:3] for c in record["commands"]] == [["python", "train.py", "-m"]] * 2 + [
        ["python", "predict.py", f"ckpt_path=[{multirun},{reseeded}]"]]
    assert "seed=1" in record["commands"][1]

    one_fold = reseeded / "0"  # a single job holds out fold 1 only: its ensemble with the sweep would be lopsided
    with pytest.raises(CheckpointError, match=r"entry 2 .* holds out folds \['1'\], the first entry folds"):
        predict(predict_config([f"ckpt_path=[{multirun},{one_fold}]"], tmp_path / "c"))


def test_unlabelled_images_csv_and_bad_images(multirun: Path, tiny: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    for src in ["CLL/CLL-000.png", "FL/FL-001.png", "MCL/MCL-002.png"]:
        (folder / "sub" / Path(src).name).write_bytes((tiny / "images" / src).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((20, 50, 3), np.uint8)).save(folder / "tiny.png")

    cfg = predict_config([f"ckpt_path={multirun}", f"images={folder}", "on_bad_image=skip", "tta=true"], tmp_path / "a")
    assert predict(cfg)["images"] == 3
    with (tmp_path / "a" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["image"]).name for r in rows] == ["CLL-000.png", "FL-001.png", "MCL-002.png"]
    assert all(r["predicted"] in CLASSES and int(r["patches"]) == 6 for r in rows)
    assert all(sum(int(r[f"votes_{c}"]) for c in CLASSES) == 6 for r in rows)
    assert all(np.isclose(sum(float(r[f"prob_{c}"]) for c in CLASSES), 1, atol=1e-4) for r in rows)
    with (tmp_path / "a" / "problems.csv").open(newline="") as handle:  # prepare's format: path,kind,detail,action
        problems = {Path(r["path"]).name: (r["kind"], r["action"]) for r in csv.DictReader(handle)}
    assert problems == {"broken.png": ("corrupt", "skipped"), "tiny.png": ("too-small", "skipped")}
    assert "skipped 2 image(s) that could not be predicted" in caplog.text  # issue 29: once only "predicted 3"

    # error: the good images are still written, then the error names every bad file
    cfg = predict_config([f"ckpt_path={multirun}", f"images={folder}"], tmp_path / "b")
    with pytest.raises(BadImagesError, match="broken.png: cannot decode") as err:
        predict(cfg)
    assert "tiny.png: 50x20 px is smaller than the 36-px window" in str(err.value)
    assert len((tmp_path / "b" / "predictions.csv").read_text().splitlines()) == 1 + 3

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no image files"):
        predict(predict_config([f"ckpt_path={multirun}", f"images={tmp_path / 'empty'}"], tmp_path / "c"))


def test_preprocessing_is_the_training_folds(multirun: Path, tiny: Path) -> None:
    first = find_checkpoints(multirun)[0]
    model = load_fold_model(first)
    assert model.fold == "1" and model.transform.crop == 32 and model.patch_size == 36 and not model.transform.train
    module = load_classifier(first)
    (record,) = (tiny / "work" / "prepared").glob("*/dataset.json")
    stats = PreparedDataset(record.parent).stats("1")
    # from the prepared data (no datamodule state), with the loader settings of the training config
    assert torch.allclose(preprocessing_of(module).mean, model.transform.mean)
    assert torch.allclose(model.transform.mean, torch.as_tensor(stats["mean_image"], dtype=torch.float32)
                          .permute(2, 0, 1).reshape(3, -1))
    module.hparams["config"]["data"]["loader"].update(crop=30, normalize="channel")
    channel = preprocessing_of(module)
    assert channel.crop == 30 and channel.normalize == "channel" and channel.side == 36
    assert torch.allclose(channel.mean[:, 0], torch.as_tensor(stats["channel_mean"], dtype=torch.float32))


def test_checkpoint_that_does_not_fit_the_data_is_refused(multirun: Path, tiny: Path, tmp_path: Path) -> None:
    first = find_checkpoints(multirun)[0]
    model = load_fold_model(first)
    with pytest.raises(CheckpointError, match=r"trained on classes \['CLL', 'FL', 'MCL'\].*has \['A', 'B', 'C'\]"):
        check_compatible([model], ["A", "B", "C"], 36, "the data")
    with pytest.raises(CheckpointError, match="trained on 36-px patches, but the grid cuts 40-px windows"):
        check_compatible([model], None, 40, "the data")
    with pytest.raises(CheckpointError, match=r"grid.size=40, but .* was trained on 36-px windows"):  # before any work
        predict(predict_config([f"ckpt_path={first}", f"images={tiny / 'images'}", "grid.size=40"], tmp_path / "a"))


class RunsCode:
    """A pickled object that would run code (create a file) when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_checkpoints_are_refused(multirun: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(find_checkpoints(multirun)[0], map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["config"]["model"] = {"_target_": "os.system", "_args_": ["echo hi"]}
    torch.save(checkpoint, tmp_path / "target.ckpt")
    with pytest.raises(CheckpointError, match=r"would instantiate \['os.system'\], which are not trusted"):
        load_fold_model(tmp_path / "target.ckpt")
    torch.save({**checkpoint, "extra": RunsCode(tmp_path / "ran")}, tmp_path / "pickle.ckpt")
    with pytest.raises(CheckpointError, match="refused.*GLOBAL .*system") as err:
        load_fold_model(tmp_path / "pickle.ckpt")
    assert isinstance(err.value.__cause__, pickle.UnpicklingError) and not (tmp_path / "ran").exists()
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_fold_model(tmp_path / "text.ckpt")
