"""Survival and regression targets for bag heads (issue 41): the Cox loss equals lifelines' partial likelihood with
Efron ties; the C-index, its interval over patients and the regression scores equal the libraries'; padding and
batch composition never change a risk; bad target rows are listed by number and a disagreeing patient is named; a
five-fold survival multirun writes its report, the class-driven target ranks well and the shuffled one's interval
covers 0.5."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import test_embeddings
import torch
from conftest import compose_config, compose_train, make_images, write_cases
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, r2_score
from test_mil import ENCODER, random_bag
from test_slide_bags import overrides, table_rows

from histoflow.common.errors import ConfigError
from histoflow.data.folds import SplitConfig
from histoflow.data.prepare import prepare_dataset
from histoflow.data.targets import TargetTableError, TaskConfig, read_targets
from histoflow.deployment.deploy import predict
from histoflow.evaluation.regression import regression_intervals, regression_scores
from histoflow.evaluation.survival import cindex_interval, harrell_c
from histoflow.features import embeddings
from histoflow.features.bag_targets import attach_targets, task_folds
from histoflow.features.bags import BagDataModule, pad_bags, patient_bags
from histoflow.inference.fold_models import find_checkpoints
from histoflow.inference.sweep_report import predict_config, write_image_report
from histoflow.models import ABMIL, MaxPool, MeanPool, build_encoder
from histoflow.testing.synthetic_targets import synthetic_survival, write_survival_table
from histoflow.training.losses import cox_efron_nll, discrete_time_nll, survival_risk
from histoflow.training.run import train


def tied_cohort(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A covariate, integer times (many ties) that depend on it, events (~70%)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = np.round(rng.exponential(1 / np.exp(0.8 * x)) * 4) + 1
    return x, time, (rng.random(n) < 0.7).astype(int)


def test_the_cox_loss_equals_lifelines_partial_likelihood_with_efron_ties() -> None:
    x, time, event = tied_cohort()
    assert len(np.unique(time[event == 1])) < event.sum()  # tied event times
    cox = CoxPHFitter().fit(pd.DataFrame({"x": x, "T": time, "E": event}), "T", "E")  # Efron ties
    risk = torch.tensor(cox.params_["x"] * x, requires_grad=True)
    loss = cox_efron_nll(risk, torch.tensor(time), torch.tensor(event), reduction="sum")
    np.testing.assert_allclose(loss.item(), -cox.log_likelihood_, rtol=1e-7)
    # at lifelines' maximum the gradient along the covariate vanishes
    loss.backward()
    assert abs(float(risk.grad @ torch.tensor(x))) < 1e-4
    mean = cox_efron_nll(risk, torch.tensor(time), torch.tensor(event))
    np.testing.assert_allclose(mean.item(), -cox.log_likelihood_ / event.sum(), rtol=1e-7)
    # adding a constant to every risk changes nothing (a Cox risk is known up to a constant), huge ones included
    shifted = cox_efron_nll(risk.detach() + 500, torch.tensor(time), torch.tensor(event), reduction="sum")
    np.testing.assert_allclose(float(shifted), float(loss), rtol=1e-7)


def test_the_discrete_time_nll_by_hand() -> None:
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    h = torch.sigmoid(logits)
    cuts = torch.tensor([1.0])
    loss = discrete_time_nll(logits, torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.0]), cuts)
    by_hand = (-torch.log(h[0, 0]) - torch.log((1 - h[1, 0]) * (1 - h[1, 1]))) / 2
    torch.testing.assert_close(loss, by_hand)
    risk = survival_risk(logits, "nll")
    torch.testing.assert_close(risk, -((1 - h[:, 0]) + (1 - h[:, 0]) * (1 - h[:, 1])))


def test_the_cindex_and_its_interval_over_patients_equal_lifelines_on_fixed_data() -> None:
    x, time, event = tied_cohort(30, seed=1)
    risk = x + np.random.default_rng(2).normal(size=30)
    assert harrell_c(time, event, risk) == pytest.approx(concordance_index(time, -risk, event))
    draws = np.random.default_rng(0).integers(0, 30, (300, 30))  # the draws of intervals.resampled_counts, seed 0
    by_library = [concordance_index(time[d], -risk[d], event[d]) for d in draws]
    assert cindex_interval(time, event, risk, resamples=300) == pytest.approx(list(np.percentile(by_library,
                                                                                                   [2.5, 97.5])))
    # two rows a patient: a resample takes both rows of each patient it draws
    patients = np.repeat([f"p{i:02d}" for i in range(15)], 2)  # sorted as numbered
    draws = np.random.default_rng(0).integers(0, 15, (300, 15))
    rows = [np.concatenate([[2 * p, 2 * p + 1] for p in d]) for d in draws]
    by_library = [concordance_index(time[r], -risk[r], event[r]) for r in rows]
    assert cindex_interval(time, event, risk, patients, resamples=300) == pytest.approx(
        list(np.percentile(by_library, [2.5, 97.5])))


def test_the_regression_scores_equal_scikit_learn_and_scipy() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(size=50)
    pred = true + rng.normal(size=50)
    scores = regression_scores(true, pred)
    assert scores["mae"] == pytest.approx(mean_absolute_error(true, pred))
    assert scores["r2"] == pytest.approx(r2_score(true, pred))
    assert scores["pearson_r"] == pytest.approx(pearsonr(true, pred)[0])
    draws = np.random.default_rng(0).integers(0, 50, (200, 50))
    by_library = [r2_score(true[d], pred[d]) for d in draws]
    assert regression_intervals(true, pred, resamples=200)["r2"] == pytest.approx(
        list(np.percentile(by_library, [2.5, 97.5])))


@pytest.mark.parametrize("make,loss", [(lambda: ABMIL(12, 1, hidden=8, attention=6), "cox"),
                                       (lambda: MeanPool(12, 1), "cox"), (lambda: MaxPool(12, 4, hidden=8), "nll"),
                                       (lambda: ABMIL(12, 4, hidden=None), "nll")])
def test_padding_and_batch_composition_never_change_a_risk(make, loss: str) -> None:
    torch.manual_seed(0)
    head = make().eval()
    bag = random_bag(5, 0)
    with torch.no_grad():
        alone = survival_risk(head(bag.features[None]), loss)
        others = [random_bag(n, s) for s, n in ((1, 40), (2, 3), (3, 17))]
        for batch in ([bag, *others], [*others, bag], [others[0], bag]):
            for b in batch:
                b.target = np.array([1.0, 1.0])
            x, mask, targets, _ = pad_bags([(b, i) for i, b in enumerate(batch)])
            assert targets.shape == (len(batch), 2) and targets.dtype == torch.float32
            x[~mask] = float("nan")
            risk = survival_risk(head(x, mask), loss)
            torch.testing.assert_close(risk[batch.index(bag)][None], alone, rtol=1e-5, atol=1e-6)


def test_bad_target_rows_are_listed_by_number_and_a_disagreeing_patient_is_named(tmp_path: Path) -> None:
    table = tmp_path / "targets.csv"
    table.write_text("slide,patient,time,event\na.svs,P1,3.5,1\nb.svs,P2,,1\nc.svs,P3,-2,0\nd.svs,P4,4,2\n"
                     "e.svs,P5,1,0\nf.svs,P5,2,0\n")
    task = TaskConfig(name="survival", loss="cox")
    with pytest.raises(TargetTableError) as error:
        read_targets(table, task)
    said = str(error.value)
    for expected in ("row 3: time missing", "row 4: time '-2'", "row 5: event '2'", "patient P5: rows 6, 7 disagree"):
        assert expected in said
    assert "row 2" not in said
    table.write_text("slide,patient,time,event\na.svs,P1,3.5,1\nb.svs,P1,3.5,1\nc.svs,P2,1,0\n")
    assert {k: list(v) for k, v in read_targets(table, task).items()} == {"P1": [3.5, 1.0], "P2": [1.0, 0.0]}
    with pytest.raises(TargetTableError, match="no column 'value'"):
        read_targets(table, TaskConfig(name="regression", loss="l1", target="value"))
    a, b = random_bag(3, 0), random_bag(4, 3)  # one label, two targets
    a.group = b.group = "case-9"
    a.target, b.target = np.array([1.0, 1.0]), np.array([2.0, 0.0])
    with pytest.raises(ConfigError, match="patient case-9: its images or slides carry 2 targets"):
        patient_bags([a, b], ["CLL", "FL", "MCL"])
    with pytest.raises(ConfigError, match="task.loss='l1' for task survival"):
        TaskConfig(name="survival", loss="l1")


def sweep(images: Path, work: Path, table: Path, out: Path, weights: Path) -> dict:
    """A five-fold survival multirun of ABMIL on image bags (the target by image), and its report."""
    overrides = [f"data.root={images}", f"paths.data_dir={work}", "protocol=images", "data.split.k=5",
                 "data.split.val_fraction=0", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
                 "encoder.preprocess.input_size=40", "model=abmil", "model.hidden=null", "model.attention=8",
                 "optimizer=adamw", "optimizer.lr=0.01", "trainer.max_epochs=10", "++data.loader.num_workers=0",
                 "bag.batch_size=8",
                 "callbacks.model_checkpoint.monitor=null", "logger=csv", "task=survival", f"task.table={table}",
                 "task.key=image"]
    for job, fold in enumerate(range(1, 6)):
        metrics = train(compose_train([*overrides, f"fold={fold}"], out / str(job), multirun=True))
        assert "test/cindex" in metrics or "test/loss" in metrics
    write_image_report(out)
    return json.loads((out / "image_report" / "report.json").read_text())


def test_a_five_fold_survival_multirun_writes_the_report(tmp_path: Path, leave_no_trace: None) -> None:
    images = make_images(tmp_path / "images", per_class=8, size=(72, 72), pixels="tint")
    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.pth"
    torch.save(build_encoder(ENCODER, 40)[0].state_dict(), weights)
    classes = {str(p.relative_to(images)): p.parent.name for p in sorted(images.glob("*/*.png"))}
    tables = {shuffled: write_survival_table(synthetic_survival(classes, seed=0, shuffled=shuffled),
                                             tmp_path / f"survival_{shuffled}.csv", key="image")
              for shuffled in (False, True)}
    informative = sweep(images, tmp_path / "work", tables[False], tmp_path / "informative", weights)
    assert informative["task"] == "survival" and informative["n"] == 24 and informative["patients"] == 24
    assert set(informative["per_fold"]) == {f"fold {k}" for k in range(1, 6)}
    report = tmp_path / "informative" / "image_report"
    for name in ("report.md", "predictions.csv", "kaplan_meier.png", "kaplan_meier_fold1.png"):
        assert (report / name).stat().st_size > 0
    assert "stratified by the event" in (report / "report.md").read_text()  # the folds drawn for the task
    low, high = informative["pooled"]["interval"]
    assert low <= informative["pooled"]["cindex"] <= high
    assert informative["pooled"]["cindex"] > 0.65  # the tint tells the class, the class the hazard
    shuffled = sweep(images, tmp_path / "work", tables[True], tmp_path / "shuffled", weights)
    low, high = shuffled["pooled"]["interval"]
    assert low <= 0.5 <= high, shuffled["pooled"]


@pytest.mark.parametrize("task", ["classification", "regression", "survival"])
def test_every_task_config_reads_into_the_task_section(task: str) -> None:
    cfg = compose_config("train", [f"task={task}"])
    assert TaskConfig.from_config(cfg.task).name == task
    assert cfg.monitor == {"classification": "val/acc_macro", "regression": "val/r2", "survival": "val/cindex"}[task]


def test_the_regression_report_pools_a_patients_bags_and_gives_intervals_over_patients(tmp_path: Path) -> None:
    """Fold runs of a regression head (two image bags a patient), as training/target_outputs.py writes them."""
    rng = np.random.default_rng(0)
    for fold in (1, 2, 3):
        run = tmp_path / str(fold - 1)
        run.mkdir()
        rows = ["image,group,fold,patches,target,predicted"]
        for p in range(8):
            target = rng.normal()
            rows += [f"{fold}-{p}-{i}.png,P{fold}{p},{fold},4,{target},{target + rng.normal(0, 0.3)}" for i in (0, 1)]
        (run / "bag_predictions.csv").write_text("\n".join(rows) + "\n")
        (run / "bags.json").write_text(json.dumps({"task": {"name": "regression", "loss": "l1", "key": "patient",
                                                            "columns": ["target"]}, "fold": str(fold),
                                                   "level": "image", "classes": []}))
    write_image_report(tmp_path)
    out = tmp_path / "image_report"
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == report["patients"] == 24 and set(report["per_fold"]) == {"fold 1", "fold 2", "fold 3"}
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 24 and set(predictions["bags"]) == {2}
    pooled = report["pooled"]
    assert pooled["mae"] == pytest.approx(mean_absolute_error(predictions["target"], predictions["predicted"]))
    for metric in ("mae", "r2", "pearson_r"):
        low, high = pooled["interval"][metric]
        assert low <= pooled[metric] <= high
    assert pooled["pearson_r"] > 0.8 and (out / "scatter.png").stat().st_size > 0
    assert "Pearson r" in (out / "report.md").read_text()


def test_slide_folds_of_a_task_are_drawn_by_patient_and_stratified_by_the_event() -> None:
    records = [SimpleNamespace(slide=f"s{i}-{j}", patient=f"P{i:02d}") for i in range(20) for j in range(2)]
    targets = {f"P{i:02d}": np.array([float(i), float(i % 2)]) for i in range(20)}
    task = TaskConfig(name="survival", loss="cox")
    folds, _ = task_folds(records, SplitConfig(k=5, val_fraction=0.0), task, targets)
    fold_of: dict[str, set[str]] = {}
    for r, f in zip(records, folds):
        fold_of.setdefault(r.patient, set()).add(f)
    assert all(len(f) == 1 for f in fold_of.values())  # a patient's slides on one side
    events = {f: sorted(int(targets[p][1]) for p, fs in fold_of.items() if f in fs) for f in set(folds)}
    assert all(e == [0, 0, 1, 1] for e in events.values()), events
    bags = [random_bag(2, k) for k in range(3)]
    for bag, patient in zip(bags, ("P00", "P01", "P99")):
        bag.group = patient
    kept, problems = attach_targets(bags, targets, task)
    assert [b.group for b in kept] == ["P00", "P01"] and list(kept[1].target) == [1.0, 1.0]
    assert [(p.path, p.kind) for p in problems] == [("bag2", "no-target")]


def test_a_regression_head_trains_per_fold_and_writes_its_report(tmp_path: Path, leave_no_trace: None) -> None:
    images = make_images(tmp_path / "images", per_class=4, size=(72, 72), pixels="tint")
    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.pth"
    torch.save(build_encoder(ENCODER, 40)[0].state_dict(), weights)
    table = tmp_path / "targets.csv"  # a number per image: 10 x the class index
    rows = [f"{p.relative_to(images)},{10 * ['CLL', 'FL', 'MCL'].index(p.parent.name)}\n"
            for p in sorted(images.glob("*/*.png"))]
    table.write_text("image,target\n" + "".join(rows))
    overrides = [f"data.root={images}", f"paths.data_dir={tmp_path / 'work'}", "protocol=images", "data.split.k=2",
                 "data.split.val_fraction=0", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
                 "encoder.preprocess.input_size=40", "model=mean_pool", "optimizer=adamw", "optimizer.lr=0.05",
                 "trainer.max_epochs=5", "++data.loader.num_workers=0", "bag.batch_size=4", "logger=csv",
                 "callbacks.model_checkpoint.monitor=null", "task=regression", f"task.table={table}", "task.key=image"]
    with pytest.raises(ConfigError, match="task=regression trains heads on bags"):
        train(compose_train([*overrides, "model=linear_head", "fold=1"], tmp_path / "patch", multirun=True))
    for job, fold in enumerate((1, 2)):
        metrics = train(compose_train([*overrides, f"fold={fold}"], tmp_path / "sweep" / str(job), multirun=True))
        assert np.isfinite(metrics["test/mae"])
    write_image_report(tmp_path / "sweep")
    report = json.loads((tmp_path / "sweep" / "image_report" / "report.json").read_text())
    assert report["task"] == "regression" and report["n"] == 12 and report["loss"] == "l1"
    assert (tmp_path / "sweep" / "image_report" / "scatter.png").stat().st_size > 0


def test_a_survival_sweep_maps_attention_and_predict_gives_each_image_the_risk_its_fold_recorded(
        tmp_path: Path, leave_no_trace: None) -> None:
    """Two folds of ABMIL on image bags with a survival target: the report's attention maps and gallery (by predicted
    risk half); `histoflow predict` of fold 1's model on the images gives each held-out image the risk fold 1
    recorded and, with targets=, the external report."""
    images = make_images(tmp_path / "images", per_class=4, size=(72, 72), pixels="tint")
    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.pth"
    torch.save(build_encoder(ENCODER, 40)[0].state_dict(), weights)
    classes = {str(p.relative_to(images)): p.parent.name for p in sorted(images.glob("*/*.png"))}
    table = write_survival_table(synthetic_survival(classes, seed=0), tmp_path / "survival.csv", key="image")
    overrides = [f"data.root={images}", f"paths.data_dir={tmp_path / 'work'}", "protocol=images", "data.split.k=2",
                 "data.split.val_fraction=0", "encoder=squeezenet1_1_imagenet", f"encoder.weights={weights}",
                 "encoder.preprocess.input_size=40", "model=abmil", "model.hidden=null", "model.attention=8",
                 "optimizer=adamw", "optimizer.lr=0.01", "trainer.max_epochs=3", "++data.loader.num_workers=0",
                 "bag.batch_size=4", "callbacks.model_checkpoint.monitor=null", "logger=csv", "task=survival",
                 f"task.table={table}", "task.key=image"]
    sweep_dir = tmp_path / "sweep"
    for job, fold in enumerate((1, 2)):
        train(compose_train([*overrides, f"fold={fold}"], sweep_dir / str(job), multirun=True))
    write_image_report(sweep_dir)
    report_dir = sweep_dir / "image_report"
    report = json.loads((report_dir / "report.json").read_text())
    assert "attention_gallery.png" in report["figures"] and (report_dir / "attention_gallery.png").stat().st_size
    maps = sorted((report_dir / "attention_maps").glob("*.json"))
    assert len(maps) == len(classes) == 12  # every held-out image, each by the fold that held it out
    halves = [json.loads(m.read_text())["predicted"] for m in maps]
    assert sorted(set(halves)) == ["high risk", "low risk"], halves
    grid = np.load(maps[0].with_suffix("").with_suffix(".map.npy"))
    assert np.nanmax(grid) == pytest.approx(1.0)  # attention / the bag's largest
    text = (report_dir / "report.md").read_text()  # image bags' folds drawn for the task, as the report says
    assert "stratified by the event" in text and "not stratified" not in text

    recorded = pd.read_csv(sweep_dir / "0" / "bag_predictions.csv")  # fold 1's held-out images, by fold 1's model
    checkpoint = find_checkpoints(sweep_dir / "0")[0]
    out = tmp_path / "predict"
    predict(predict_config([f"ckpt_path={checkpoint}", f"images={images}", f"targets={table}", "progress=false"],
                           out))
    rows = pd.read_csv(out / "predictions.csv")
    assert {"risk", "risk_sd", "risk_fold1"} <= set(rows.columns) and "predicted" not in rows.columns
    risk = {str(Path(r.image).relative_to(images)): r.risk_fold1 for r in rows.itertuples()}
    assert len(recorded) == 6
    for r in recorded.itertuples():
        assert risk[r.image] == pytest.approx(r.risk, rel=1e-6, abs=2e-6)  # float32 of an unbounded risk
    external = json.loads((out / "report.json").read_text())
    assert external["task"] == "survival" and external["n"] == 12 and external["external"]
    low, high = external["pooled"]["interval"]
    assert low <= external["pooled"]["cindex"] <= high
    assert (out / "kaplan_meier.png").stat().st_size > 0


def test_a_survival_head_on_patient_bags_of_a_table_without_labels_is_put_to_work_on_new_slides(
        synthetic_slide_cohort: Path, weights: Path, tmp_path: Path, leave_no_trace: None) -> None:
    """A slide table of slide,patient,time,event (no label) trains two folds of ABMIL on patient bags; `histoflow
    predict slides=<that table>` gives each patient every fold model's risk (fold 1's held-out patients the risk fold
    1 recorded), their mean and sd, the attention maps, and the external report from the table's time and event."""
    rows = table_rows(synthetic_slide_cohort)
    survival = synthetic_survival({r["patient"]: r["label"] for r in rows}, seed=0)
    table = tmp_path / "cohort.csv"
    table.write_text("slide,patient,time,event\n" + "".join(
        f"{(synthetic_slide_cohort.parent / r['slide']).resolve()},{r['patient']},{survival[r['patient']][0]},"
        f"{survival[r['patient']][1]}\n" for r in rows))
    sweep_dir = tmp_path / "sweep"
    for job, fold in enumerate((1, 2)):
        train(compose_train([*overrides(table, weights, tmp_path / "work", "model.hidden=16", "bag.level=patient",
                                        "data.split.k=2", "trainer.max_epochs=2", "task=survival", f"fold={fold}")],
                            sweep_dir / str(job), multirun=True))
    out = tmp_path / "predict"
    predict(predict_config([f"ckpt_path={sweep_dir}", f"slides={table}", "on_bad_image=skip", "slide.progress=false",
                            "slide.num_workers=1", "progress=false"], out))
    patients = pd.read_csv(out / "patients.csv").set_index("patient")
    assert len(patients) == len(survival) == 9
    assert {"risk", "risk_sd", "risk_fold1", "risk_fold2"} <= set(patients.columns)
    recorded = pd.read_csv(sweep_dir / "0" / "bag_predictions.csv")  # fold 1's held-out patients
    assert len(recorded) > 0
    for r in recorded.itertuples():
        assert patients.loc[r.image, "risk_fold1"] == pytest.approx(r.risk, rel=1e-6, abs=2e-6)
    both = patients[["risk_fold1", "risk_fold2"]].to_numpy()
    np.testing.assert_allclose(patients["risk"], both.mean(1), atol=2e-6)
    np.testing.assert_allclose(patients["risk_sd"], both.std(1), atol=2e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "survival" and report["n"] == 9 and report["external"]
    assert (out / "kaplan_meier.png").stat().st_size > 0 and (out / "attention_gallery.png").stat().st_size > 0
    assert len(list((out / "attention_maps").glob("*.heatmap.png"))) == len(rows)


def test_image_bag_folds_of_a_survival_task_are_by_patient_stratified_by_the_event_and_the_same_in_every_job(
        tmp_path: Path) -> None:
    """Image bags of task=survival draw their folds from the manifest's patients, stratified by the event: no patient
    in two folds, each fold's event share within one patient of the whole's, and every fold job gives an image the
    same fold; classification keeps the manifest's folds."""
    images = write_cases(make_images(tmp_path / "images", per_class=8, size=(72, 72), pixels="tint"), per_case=2)
    torch.manual_seed(0)
    weights = tmp_path / "squeezenet.pth"
    torch.save(build_encoder(ENCODER, 40)[0].state_dict(), weights)
    encoder = {**ENCODER, "weights": str(weights)}
    data = {**test_embeddings.data_config(images, tmp_path / "work"), "groups": str(images / "cases.csv"),
            "split": {"kind": "kfold", "k": 4, "val_fraction": 0.0, "seed": 3}}
    cases = pd.read_csv(images / "cases.csv")
    patient_class = dict(zip(cases.group, cases.label))  # 12 patients of 2 images each
    survival = synthetic_survival(patient_class, seed=0)
    table = write_survival_table(survival, tmp_path / "survival.csv", key="patient")

    def module(fold: int, task: dict | None) -> BagDataModule:
        made = BagDataModule(fold=fold, preprocess=embeddings.input_preprocess(None, encoder),
                             embed=embeddings.Embedder(encoder, "cpu"), bag={"batch_size": 4}, task=task, **data)
        made.prepare_data()
        made.setup("fit")
        return made

    task = {"name": "survival", "loss": "cox", "table": str(table), "key": "patient"}
    folds_of_job = []
    for fold in (1, 2):
        made = module(fold, task)
        bags = [b for role in ("train", "val", "test") for b in made.bags[role]]
        assert len(bags) == 24 and {b.fold for b in made.bags["test"]} == {str(fold)}
        assert not {b.group for b in made.bags["test"]} & {b.group for b in made.bags["train"]}
        folds_of_job.append({b.name: b.fold for b in bags})
    assert folds_of_job[0] == folds_of_job[1]  # a held-out image's fold is the same in every job
    fold_of_patient: dict[str, set[str]] = {}
    for name, fold in folds_of_job[0].items():
        fold_of_patient.setdefault(str(cases.set_index("image").group[name]), set()).add(fold)
    assert all(len(f) == 1 for f in fold_of_patient.values())  # no patient in two folds
    events = {p: survival[p][1] for p in fold_of_patient}
    overall = np.mean(list(events.values()))
    assert 0 < overall < 1, events  # the fixture has both events and censored patients
    for fold in {"1", "2", "3", "4"}:
        members = [p for p, f in fold_of_patient.items() if f == {fold}]
        share = np.mean([events[p] for p in members])
        assert abs(share - overall) <= 1 / len(members) + 1e-9, (fold, members, share, overall)

    manifest = prepare_dataset(data, quiet=True).manifest()
    classification = module(1, None)
    assert {b.name: b.fold for role in ("train", "val", "test") for b in classification.bags[role]} == \
        {r["image"]: str(r["fold"]) for r in manifest}  # classification: the manifest's folds, as they were
    assert {b.name for b in classification.bags["test"]} == {r["image"] for r in manifest if str(r["fold"]) == "1"}
