"""Training: every config composes, every experiment runs, multirun + W&B offline + summary, DDP, resume.

All on CPU with tiny synthetic images made here; the slow tests run train.py in subprocesses.
Deselect them with `-m "not slow"`.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision
import wandb
from conftest import (
    CLASSES,
    LocalServer,
    compose_config,
    compose_train,
    env_without_wandb_account,
    make_images,
    wandb_run_summary,
    write_cases,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from histoflow.common.errors import ConfigError, HistoflowError, MissingInputError
from histoflow.evaluation.tables import read_confusion_csv
from histoflow.models import build_encoder, is_bag_head
from histoflow.models.build import build_net
from histoflow.slides.table import read_slide_table
from histoflow.training.checkpoints import load_classifier
from histoflow.training.loggers import CSVLogger, WandbLogger
from histoflow.training.outputs import merge_csv_metrics
from histoflow.training.run import train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = ["data", "model", "encoder", "optimizer", "scheduler", "trainer", "logger", "callbacks", "protocol",
          "experiment"]
SUBPROCESS_TIMEOUT_S = 300


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("leave_no_trace")


def images_of_widths(root: Path, widths: tuple[int, ...]) -> Path:
    """10 RGB images per class (conftest's CLASSES, the lymphoma config's, so data=lymphoma works unchanged),
    68 px high and of the given widths in turn; the classes differ in colour."""
    return make_images(root, per_class=10, size=(widths[0], 68), pixels="tint", widths=widths, digits=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images 100, 132 or 164 px wide (12, 16 or 20 patches of 36 px with the two rotations), so shards
    hold unequal numbers of patches; prepared once into <tiny>/work by the first test that trains."""
    base = tmp_path_factory.mktemp("tiny")
    images_of_widths(base / "images", widths=(100, 132, 164))
    return base


def tiny_overrides(base: Path) -> list[str]:
    """<base>/images as data, in shards of two images or one (30+ patches), so of unequal sizes; outputs
    under base; no loader worker processes."""
    return [
        f"data.root={base / 'images'}",
        "data.shards.samples_per_shard=30",
        "data.shards.workers=1",
        "++data.loader.batch_size=16",
        "++data.loader.eval_batch_size=64",
        "++data.loader.num_workers=0",
        "++data.loader.shuffle_buffer=64",
        *run_overrides(base),
    ]


def slide_table_overrides(table: Path, base: Path) -> list[str]:
    """A slide table as data (data=slides): the slides' tiles decoded by one worker, no progress bar; outputs under
    base."""
    return [f"data.table={table}", "data.slide.num_workers=1", "data.slide.progress=false", *run_overrides(base)]


def run_overrides(base: Path) -> list[str]:
    return [
        f"paths.data_dir={base / 'work'}",
        f"paths.log_dir={base / 'logs'}",
        f"paths.cache_dir={base / 'cache'}",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
    ]


def reads_a_slide_table(group: str, option: str) -> bool:
    """Whether `group=option` makes the data a slide table (data=slides), not a folder of images."""
    return "table" in compose_config("train", [f"{group}={option}"]).data


def _tensorboard_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def run_train(args: list[str], env: dict[str, str], timeout: float = SUBPROCESS_TIMEOUT_S,
              entry: tuple[str, ...] = (str(REPO / "train.py"),)) -> None:
    """python train.py ARGS (or another entry: `-m histoflow train`), which must succeed within timeout seconds."""
    result = subprocess.run([sys.executable, *entry, *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"train.py {' '.join(args)} failed:\n{output}"


def prepared_record(base: Path) -> dict:
    """The completion record of the tiny data set prepared under base (one data set, one record)."""
    (record,) = (base / "work" / "prepared").glob("*/dataset.json")
    return json.loads(record.read_text())


def checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group: str, tiny: Path, tmp_path: Path) -> None:
    options = group_options(group)
    assert options, f"conf/{group}/ has no options"
    for option in options:
        data = slide_table_overrides(tiny / "cohort.csv", tiny) if reads_a_slide_table(group, option) else \
            tiny_overrides(tiny)
        cfg = compose_train([*data, f"{group}={option}"], tmp_path)
        plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert plain["output_dir"] == str(tmp_path)
        if group == "model":
            head = "in_features" in cfg.model  # a head on an encoder's features (model=linear_head)
            net = build_net(cfg.model, num_classes=3, input_size=64, in_features=32 if head else None)
            # a bag head (model=abmil) takes bags of tile features, (bags, tiles, features); torchvision's alexnet
            # needs >= 63 px
            x = (torch.randn(2, 5, 32) if is_bag_head(cfg.model) else torch.randn(2, 32)) if head else \
                torch.randn(2, 3, 64, 64)
            with torch.no_grad():
                assert net.eval()(x).shape == (2, 3)
        if group == "encoder":
            cfg.encoder.weights = None  # random initialisation: the real file is tested in test_embeddings
            if "pretrained" in cfg.encoder:
                cfg.encoder.pretrained = False  # no hub here
            encoder, width = build_encoder(cfg.encoder, 64)
            assert width > 0 and not any(p.requires_grad for p in encoder.parameters())
        if group == "optimizer":
            param = torch.nn.Parameter(torch.zeros(2))
            assert isinstance(instantiate(cfg.optimizer)(params=[param]), torch.optim.Optimizer)
        if group == "scheduler":
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
            assert hasattr(instantiate(cfg.scheduler)(optimizer=optimizer), "step")
        if group in ("callbacks", "trainer"):
            for node in cfg.callbacks.values():
                assert isinstance(instantiate(node), pl.Callback)
        if group == "trainer" and cfg.trainer.accelerator != "gpu":
            assert isinstance(instantiate(cfg.trainer, logger=False), pl.Trainer)
        if group == "logger":
            assert "csv" in cfg.logger, f"logger={option} must include the CSV logger"
            for name, node in cfg.logger.items():
                if name == "tensorboard" and not _tensorboard_installed():
                    continue  # an optional package; the config composed and resolved above
                assert isinstance(instantiate(node), pl.loggers.Logger)


def test_gpu_trainer_is_bf16_channels_last(tiny: Path, tmp_path: Path) -> None:
    cfg = compose_train([*tiny_overrides(tiny), "trainer=gpu"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.callbacks.channels_last._target_ == "histoflow.training.callbacks.ChannelsLast"
    assert "model_checkpoint" in cfg.callbacks  # the default callbacks are still there


def test_slurm_launcher_composes(tiny: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config("train", [*tiny_overrides(tiny), "hydra/launcher=slurm", "trainer=ddp"],
                         return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["tasks_per_node"] == 2 and launcher["nodes"] == 1


# --- W&B mode and the fold summary -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "offline"),  # no key at all
        ({"WANDB_MODE": "disabled"}, "disabled"),  # the user's choice wins
        ({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}, "offline"),  # key, no server
        ({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "SILENT"}, "offline"),  # accepts, never answers
        ({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "ANSWERING"}, "online"),  # answers (any status would do)
    ],
)
def test_wandb_mode(env: dict[str, str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    http_server: LocalServer) -> None:
    import socket

    from histoflow.training.tracking import configure_wandb

    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes TCP handshakes; nothing ever reads or answers
        urls = {"SILENT": f"http://127.0.0.1:{silent.getsockname()[1]}", "ANSWERING": http_server.url}
        for name, value in env.items():
            monkeypatch.setenv(name, urls.get(value, value))
        t0 = time.monotonic()
        assert configure_wandb() == expected
        assert time.monotonic() - t0 < 10  # a silent server costs the probe's timeout, not a hang
    assert os.environ["WANDB_MODE"] == expected and os.environ["WANDB_SILENT"] == "true"


def test_summarize_sweep(tmp_path: Path) -> None:
    from histoflow.evaluation.figures import save_confusion_matrix
    from histoflow.training.fold_summary import summarize_sweep

    for job, (fold, acc) in enumerate([("1", 0.5), ("2", 0.75), ("3", 1.0)]):
        run = tmp_path / str(job)
        run.mkdir()
        (run / "test_metrics.json").write_text(json.dumps({"fold": fold, "test/acc_macro": acc, "train/loss": 0.1,
                                                           "best_checkpoint": None}))
        save_confusion_matrix(np.eye(3, dtype=np.int64) * (job + 1), CLASSES, run / "confusion_test")
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text("data:\n  groups: cases.csv\n  split: {kind: kfold}\n")
    summary = summarize_sweep(tmp_path).read_text()
    assert "Protocol: case folds" in summary and json.loads((tmp_path / "summary.json").read_text())["protocol"]
    assert "| fold 3 | 1.000 |" in summary and "| mean ± sd | 0.750 ± 0.250 |" in summary
    assert "train/loss" not in summary
    assert "Job folders: fold 1 in 0/, fold 2 in 1/, fold 3 in 2/." in summary  # Hydra counts from 0, folds from 1
    assert json.loads((tmp_path / "summary.json").read_text())["jobs"]["fold 3"] == "2/"
    cm, classes = read_confusion_csv(tmp_path / "confusion_pooled.csv")
    assert classes == CLASSES and np.array_equal(cm, np.eye(3, dtype=np.int64) * 6)
    assert summarize_sweep(tmp_path / "0" / "checkpoints") is None  # no finished job there


# --- in-process runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_fast_dev_run(experiment: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if reads_a_slide_table("experiment", experiment):  # a cohort of slides of generated tissue
        table: Path = request.getfixturevalue("synthetic_slide_cohort")
        data, classes = slide_table_overrides(table, tmp_path), sorted({r.label for r in read_slide_table(table)})
    else:  # equal sizes (tile data sets need them), 200 px square: room for every experiment's window (<= 192 px)
        write_cases(make_images(tmp_path / "images", per_class=10, size=(200, 200), pixels="tint", digits=3))
        data, classes = tiny_overrides(tmp_path), CLASSES
    overrides = [f"experiment={experiment}", *data, "trainer.fast_dev_run=true", "logger=csv"]
    cfg = compose_train(overrides, tmp_path / "run")
    for net in ("model", "encoder"):
        if cfg.get(net) and "weights" in cfg[net]:
            cfg[net].weights = None  # no network in tests: random initialisation instead of a download
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc_macro"] <= 1.0 and np.isfinite(metrics["test/loss"])
    cm, written = read_confusion_csv(tmp_path / "run" / "confusion_test.csv")
    assert written == classes and cm.sum() > 0
    assert (tmp_path / "run" / "confusion_test.png").is_file() and (tmp_path / "run" / "test_metrics.json").is_file()


def test_tensorboard_logger_writes_events(tiny: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny), "logger=tensorboard", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    train(compose_train(overrides, tmp_path))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (tmp_path / "metrics.csv").is_file()  # the CSV logger stays on beside it


def test_early_stopping_ends_a_run_whose_validation_stops_improving(tiny: Path, tmp_path: Path) -> None:
    # min_delta 2: no epoch can raise val/acc_macro (at most 1) by that much, so patience 1 stops after epoch 2
    overrides = [*tiny_overrides(tiny), "callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                 "+callbacks.early_stopping.min_delta=2", "trainer.max_epochs=6", "logger=csv", "test=false",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    train(compose_train(overrides, tmp_path))
    with (tmp_path / "metrics.csv").open(newline="") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row.get("val/acc_macro")}
    assert epochs == {"0", "1"}  # validated twice, then stopped, not six times


def test_swap_model_and_optimizer_on_the_command_line(tiny: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny), "model=resnet18", "optimizer=sgd", "logger=csv",
                 "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    metrics = train(compose_train(overrides, tmp_path))
    classifier = load_classifier(metrics["best_checkpoint"])
    assert isinstance(classifier.model, torchvision.models.ResNet) and classifier.model.fc.out_features == 3
    assert classifier.hparams.config["optimizer"]["_target_"] == "torch.optim.SGD"
    assert classifier.classes == CLASSES
    saved = checkpoint_state(Path(metrics["best_checkpoint"]))
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["config"]["fold"] == 1
    # Every metric is in the CSV log, and the curves are drawn from it.
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_epoch", "val/acc_macro", "val/acc_micro", "val/f1_macro"} <= set(header)
    assert (tmp_path / "training_curves.png").is_file()


# --- subprocess runs ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_multirun_two_folds_offline_wandb_and_summary(tiny: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    run_train(["-m", "fold=1,2", *tiny_overrides(tiny), f"hydra.sweep.dir={sweep}", "logger=wandb",
               "trainer.max_epochs=2"], env_without_wandb_account(tmp_path))
    pooled = np.zeros((3, 3), dtype=np.int64)
    for job, fold in (("0", "1"), ("1", "2")):
        run = sweep / job
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert checkpoint_state(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]["fold"] == int(fold)
        assert (run / "csv" / "version_0" / "metrics.csv").is_file() and (run / "metrics.csv").is_file()
        offline_runs = list((run / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1, f"job {job}: expected one offline W&B run, found {offline_runs}"
        assert list(offline_runs[0].glob("run-*.wandb")), "the offline run has no data file"
        assert json.loads((run / "test_metrics.json").read_text())["fold"] == fold
        pooled += read_confusion_csv(run / "confusion_test.csv")[0]
    summary = (sweep / "summary.md").read_text()
    assert "| fold 1 |" in summary and "| fold 2 |" in summary and "mean ± sd" in summary
    assert "Job folders: fold 1 in 0/, fold 2 in 1/." in summary  # issue 29: folders 0, 1 hold folds 1, 2
    saved = json.loads((sweep / "summary.json").read_text())
    assert saved["summary"]["test/acc_macro"]["n"] == 2.0
    assert np.array_equal(read_confusion_csv(sweep / "confusion_pooled.csv")[0], pooled)
    # One W&B run per fold, named by fold: the offline run files hold their own name and not the other's.
    for job, fold, other in (("0", 1, 2), ("1", 2, 1)):
        data = next((sweep / job / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
        assert f"lymphoma-alexnet32-fold{fold}".encode() in data
        assert f"lymphoma-alexnet32-fold{other}".encode() not in data
    # Issue 42: the k-fold report is one more run in the folds' group, holding its keys, figures and tables.
    assert_report_run(sweep, "lymphoma-alexnet32")


REPORT_KEYS = ["report/acc", "report/acc_low", "report/acc_high", "report/case_acc", "report/case_acc_low",
               "report/case_acc_high", "report/balanced_acc", "report/f1_macro", "report/colour_acc",
               "report/patients", "report/acc_mean", "report/acc_sd", "report/folds"]


def assert_report_run(sweep: Path, group: str) -> None:
    """<sweep>/image_report/wandb holds one offline run: group `group`, job_type report, the report.json keys
    (also in summary.json) as its summary, the folds' test metrics, and its figures and tables as media files."""
    keys = json.loads((sweep / "image_report" / "report.json").read_text())["keys"]
    assert set(REPORT_KEYS) <= set(keys) and keys["report/folds"] == 2.0
    assert keys["report/acc_low"] <= keys["report/acc"] <= keys["report/acc_high"]
    assert json.loads((sweep / "summary.json").read_text())["report"] == keys
    (offline,) = (sweep / "image_report" / "wandb").glob("offline-run-*")
    run, summary = wandb_run_summary(next(offline.glob("run-*.wandb")))
    assert (run.run_group, run.job_type, run.display_name) == (group, "report", f"{group}-report")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["name"] == group and config["folds"] == [1, 2]
    assert {k: summary[k] for k in keys} == keys
    assert summary["folds/test/acc_macro_mean"] == json.loads((sweep / "summary.json").read_text())["summary"][
        "test/acc_macro"]["mean"]
    for media in ("report/confusion", "report/reliability", "report/per_fold", "folds/test_metrics"):
        assert (offline / "files" / summary[f"{media}/path"]).is_file(), f"{media} not logged"
    per_fold = json.loads((offline / "files" / summary["report/per_fold/path"]).read_text())
    assert [row[0] for row in per_fold["data"]] == ["fold 1", "fold 2", "mean", "sd"]


@pytest.mark.slow
def test_a_csv_sweep_logs_no_report_run_and_compares_without_wandb(tiny: Path, tmp_path: Path) -> None:
    """Issue 42: logger=csv: no W&B run anywhere, the report's keys in report.json and summary.json all the same,
    and `histoflow summary` prints the sweep's row with its intervals."""
    sweep = tmp_path / "multirun"
    env = env_without_wandb_account(tmp_path)
    run_train(["-m", "fold=1,2", *tiny_overrides(tiny), f"hydra.sweep.dir={sweep}", "logger=csv", "name=tiny-csv"],
              env)
    assert not list(sweep.rglob("wandb")), "a W&B folder in a sweep that did not log to W&B"
    keys = json.loads((sweep / "image_report" / "report.json").read_text())["keys"]
    assert json.loads((sweep / "summary.json").read_text())["report"] == keys
    shown = subprocess.run([sys.executable, "-m", "histoflow", "summary", str(sweep)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    (row,) = [line for line in shown.stdout.splitlines() if line.startswith("| tiny-csv |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[3] == (f"{keys['report/acc']:.3f} [{keys['report/acc_low']:.2f}, "
                                            f"{keys['report/acc_high']:.2f}]")


@pytest.mark.slow
def test_ddp_two_cpu_processes_unequal_shards(tiny: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "ddp"
    # A multirun of one job: Lightning's DDP child process must re-run this job, not the whole sweep; started as
    # `python -m histoflow train`, the child re-runs the train command (histoflow.commands.train), not the cli.
    run_train(["-m", "fold=2", *tiny_overrides(tiny), "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
               "logger=csv", f"hydra.sweep.dir={sweep}"], env_without_wandb_account(tmp_path), timeout=240,
              entry=("-m", "histoflow", "train"))
    # The two ranks had unequal shares (every other shard each) of shards of unequal sizes.
    sizes = [s["samples"] for s in prepared_record(tiny)["shards"] if s["fold"] != "2" and s["part"] == "fit"]
    assert len(set(sizes)) > 1 and sum(sizes[0::2]) != sum(sizes[1::2]), f"shards not unequal enough: {sizes}"
    ckpt = checkpoint_state(sweep / "0" / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0 and ckpt["global_step"] > 0
    assert json.loads((sweep / "0" / "test_metrics.json").read_text())["fold"] == "2"
    assert not list(sweep.glob("1")), "the DDP child started a second job"
    assert (sweep / "summary.md").is_file()


@pytest.mark.slow
def test_resume_after_kill_reaches_the_same_end_state(tiny: Path, tmp_path: Path) -> None:
    env = env_without_wandb_account(tmp_path)
    # Long enough epochs that the kill lands mid-run; num_workers=0 so every draw follows EpochSeed.
    args = [*tiny_overrides(tiny), "logger=csv", "trainer.max_epochs=3", "++data.loader.epoch_batches=8",
            "++data.loader.batch_size=8", "test=false"]
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    run_train([*args, f"hydra.run.dir={unbroken}"], env)

    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={killed}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # os.kill(pid, SIGKILL), unless it has already ended and been reaped
    assert proc.wait(timeout=30) == -signal.SIGKILL, "train.py ended before it could be killed mid-way"
    assert checkpoint_state(last)["epoch"] < 2, "the kill came too late to test a resume"

    run_train([*args, f"hydra.run.dir={killed}", "ckpt_path=last"], env)
    ends = [checkpoint_state(run / "checkpoints" / "last.ckpt") for run in (unbroken, killed)]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 3 * 8
    for key, value in ends[0]["state_dict"].items():
        assert torch.equal(value, ends[1]["state_dict"][key]), f"{key} differs after resume"
    # The curves of both parts of the killed run are merged into one metrics file.
    assert len(list((killed / "csv").glob("version_*"))) == 2
    with (killed / "metrics.csv").open(newline="") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row["val/acc_macro"]}
    assert epochs == {"0", "1", "2"}


def test_merged_metrics_keep_each_step_once_after_a_resume(tmp_path: Path) -> None:
    """Rows logged after the last checkpoint and before a kill are done again by the resumed part: kept once."""
    first, second = tmp_path / "csv" / "version_0", tmp_path / "csv" / "version_1"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    (first / "metrics.csv").write_text("epoch,step,train/loss,val/acc_macro\n0,3,0.9,\n0,7,,0.5\n1,11,0.7,\n")
    (second / "metrics.csv").write_text("epoch,step,train/loss,val/acc_macro,lr\n1,8,,,0.1\n1,11,0.6,,\n1,15,,0.6,\n")
    merged = merge_csv_metrics(tmp_path / "csv", tmp_path / "metrics.csv")
    with merged.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("3", "0.9"), ("7", ""), ("8", ""), ("11", "0.6"),
                                                              ("15", "")]
    assert rows[0]["lr"] == ""  # a column only the second part has


def test_csv_logger_keeps_its_rows_when_killed_while_adding_a_column(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A new column rewrites metrics.csv; dying mid-rewrite leaves the old file whole (Lightning's truncates it)."""
    logger = CSVLogger(tmp_path, name="csv")
    logger.log_metrics({"val/acc_macro": 0.5}, step=7)
    logger.save()
    logger.log_metrics({"train/loss_epoch": 0.9}, step=7)
    logger.save()  # a new column: the file is rewritten with it
    metrics_csv = Path(logger.log_dir) / "metrics.csv"
    with metrics_csv.open(newline="") as handle:
        rows = [(r["val/acc_macro"], r["train/loss_epoch"]) for r in csv.DictReader(handle)]
    assert rows == [("0.5", ""), ("", "0.9")]
    before = metrics_csv.read_text()

    def killed(self: csv.DictWriter, rows: object) -> None:
        raise KeyboardInterrupt  # stands for the SIGKILL, after the new file's header is written

    logger.log_metrics({"lr-Adagrad": 0.01}, step=8)
    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert metrics_csv.read_text() == before


# --- resuming, and checkpoints that survive a failed write -------------------------------------------------


def short_run(base: Path, *extra: str) -> list[str]:
    """Overrides of a run of two training batches an epoch, one validation batch, no test."""
    return [*tiny_overrides(base), "logger=csv", "test=false", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", *extra]


def test_resume_last_without_the_run_folder_fails_naming_where_it_looked(tiny: Path, tmp_path: Path) -> None:
    earlier = tmp_path / "runs" / "2024-01-01_00-00-00"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").touch()
    new = tmp_path / "runs" / "2024-01-02_00-00-00"  # what Hydra makes when hydra.run.dir is not given
    with pytest.raises(MissingInputError) as error:
        train(compose_train(short_run(tiny, "ckpt_path=last"), new))
    message = str(error.value)
    assert str(new / "checkpoints") in message and "hydra.run.dir=" in message and "ckpt_path=<" in message
    assert str(earlier) in message  # a run it could have meant
    assert not (new / "checkpoints").exists(), "it trained from scratch"


def test_resume_last_in_a_multirun_resumes_each_job_and_starts_the_jobs_not_begun(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # a multirun job rewrites it for Lightning's DDP children
    sweep = tmp_path / "multirun"
    with pytest.raises(MissingInputError) as error:  # a new sweep: nothing to resume in any job
        train(compose_train(short_run(tiny, "ckpt_path=last"), sweep / "1", multirun=True))
    assert str(sweep) in str(error.value) and "hydra.sweep.dir=" in str(error.value)

    train(compose_train(short_run(tiny), sweep / "0", multirun=True))  # the job that ran before the interruption
    train(compose_train(short_run(tiny, "ckpt_path=last", "fold=2"), sweep / "1", multirun=True))
    assert checkpoint_state(sweep / "1" / "checkpoints" / "last.ckpt")["global_step"] == 2  # from scratch
    assert sys.argv[-1] == "ckpt_path=null"  # what a DDP child of that job would have been told
    train(compose_train(short_run(tiny, "ckpt_path=last", "trainer.max_epochs=2"), sweep / "0", multirun=True))
    assert checkpoint_state(sweep / "0" / "checkpoints" / "last.ckpt")["global_step"] == 4  # resumed
    assert sys.argv[-1] == f'ckpt_path="{sweep / "0" / "checkpoints" / "last.ckpt"}"'


@pytest.mark.parametrize("kind", ["missing", "text", "tensors"])
def test_resume_from_a_file_that_is_no_checkpoint_names_it(kind: str, tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "tensors":
        torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(HistoflowError) as error:
        train(compose_train(short_run(tiny, f"ckpt_path={path}"), tmp_path / "run"))
    message = str(error.value)
    assert str(path) in message and "ckpt_path=last hydra.run.dir=" in message
    assert "file an issue" not in message


def test_resume_with_another_optimizer_or_fold_fails_naming_both(tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_train(short_run(tiny, "optimizer=adagrad"), run))
    for change, trained, asked in (("optimizer=sgd", "torch.optim.Adagrad", "torch.optim.SGD"), ("fold=2", "1", "2")):
        key = change.split("=")[0]
        with pytest.raises(ConfigError) as error:
            train(compose_train(short_run(tiny, "ckpt_path=last", "trainer.max_epochs=2", change), run))
        message = str(error.value)
        assert f"{key}" in message and f"={trained}," in message and f"asks for {asked}" in message
        assert "leave out ckpt_path" in message
    assert checkpoint_state(run / "checkpoints" / "last.ckpt")["global_step"] == 2  # untouched


def full_disk(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Emulate `folder` on a full disk, and the system temp folder on another file system (a tmpfs /tmp): a
    rename into folder from elsewhere is refused (EXDEV, so a move copies), and writing a file into folder, by
    torch.save or a copy, stops with ENOSPC after half of its bytes."""
    real_save, real_copyfile, real_rename = torch.save, shutil.copyfile, os.rename

    def half_then_full(data: bytes, handle: io.BufferedIOBase) -> None:
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if Path(str(getattr(f, "name", ""))).parent != folder:  # e.g. into memory
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        half_then_full(buffer.getvalue(), f)

    def copyfile(src: str, dst: str, *args: object, **kwargs: object) -> str:
        if Path(dst).parent != folder:
            return real_copyfile(src, dst, *args, **kwargs)
        with open(dst, "wb") as handle:
            half_then_full(Path(src).read_bytes(), handle)

    def rename(src: str, dst: str, *args: object, **kwargs: object) -> None:
        if Path(dst).parent == folder != Path(src).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    monkeypatch.setattr(os, "rename", rename)


def test_checkpoint_write_on_a_full_disk_leaves_the_previous_one_whole(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = instantiate(compose_train(tiny_overrides(tiny), tmp_path).trainer, logger=False)
    writer = trainer.strategy.checkpoint_io  # what ModelCheckpoint's trainer.save_checkpoint writes with
    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    writer.save_checkpoint({"global_step": 1, "weight": torch.ones(1000)}, last)
    full_disk(monkeypatch, folder)
    with pytest.raises(OSError) as error:
        writer.save_checkpoint({"global_step": 2, "weight": torch.zeros(100_000)}, last)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert checkpoint_state(last)["global_step"] == 1
    assert torch.equal(checkpoint_state(last)["weight"], torch.ones(1000))
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"], "a partial file is left behind"
    writer.save_checkpoint({"global_step": 2}, last)  # with room again, the write replaces it
    assert checkpoint_state(last)["global_step"] == 2 and sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_resume_last_without_the_run_folder_exits_1_with_the_fix(tiny: Path, tmp_path: Path) -> None:
    env = env_without_wandb_account(tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *short_run(tiny, "ckpt_path=last")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "hydra.run.dir=" in result.stderr and "Traceback" not in result.stderr


def test_the_wandb_logger_starts_without_the_anonymous_notice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capfd: pytest.CaptureFixture) -> None:
    """Issue 29: wandb said "The anonymous setting has no effect" on every run, for the argument Lightning's
    logger passes; histoflow's logger leaves it out (a user's own value still goes through)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    logger = WandbLogger(project="histoflow-test", save_dir=str(tmp_path), offline=True)
    try:
        assert logger.experiment.id
    finally:
        wandb.finish()
    assert "anonymous" not in capfd.readouterr().err.lower()
    assert WandbLogger(project="p", save_dir=str(tmp_path), anonymous=True)._wandb_init["anonymous"] == "allow"
