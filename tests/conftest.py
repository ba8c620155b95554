"""Shared fixtures and helpers: the real data under ../shared/data (or $HISTOFLOW_DATA), skipped when absent; cohorts
of slides, written from generated tissue (always) or cut from the real slides (where present); a tiny encoder's
weights; tiny class folders and case tables; composed configs and training runs that leave no trace; a local HTTP
server; the figures a test saved; W&B's offline run files read back."""

from __future__ import annotations

import csv
import json
import os
import struct
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from PIL import Image

from histoflow.models import build_encoder

# the package's test-only helpers, imported here alone (test files take them from conftest): one line to change
# when they move
from histoflow.testing.cohort_fixture import build_cohort, write_slide_tiff

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # the project's own tools (tools/results.py), not part of the package


def shared_data_dir() -> Path:
    """Where the real test data lives: $HISTOFLOW_DATA, else ../shared/data beside the clone."""
    return Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data")).resolve()


def _require(sub: str) -> Path:
    path = shared_data_dir() / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent: set HISTOFLOW_DATA to the folder holding '{sub}/'")
    return path


@pytest.fixture(scope="session")
def lymphoma_dir() -> Path:
    return _require("lymphoma")


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    return _require("wsi")


@pytest.fixture(scope="session")
def kather_dir() -> Path:
    return _require("kather2016-sample")


# ---------------------------------------------------------------- cohorts of slides

COHORT_SOURCES = ("synthetic", "real")  # what a cohort test runs on: written tissue always, the real slides if present
SYNTHETIC_LABELS = {"dense": (0.30, 1.0), "sparse": (0.05, 1.0), "pale": (0.15, 0.5)}  # label: (nuclei share, stain)
GLASS, EOSIN, HAEMATOXYLIN = np.array([242, 242, 242]), np.array([222, 135, 185]), np.array([90, 55, 145])


def tissue_image(side: int, rng: np.random.Generator, nuclei: float, stain: float) -> np.ndarray:
    """A side x side RGB uint8 slide: glass with tissue over about half of it (a smooth random shape, so tiles at its
    border are part tissue), eosin pink with round-ish haematoxylin nuclei (`nuclei`: their share of the tissue) at
    `stain` (1 full colour, 0 glass), with pixel noise."""
    shape = np.asarray(Image.fromarray(rng.normal(size=(6, 6)).astype(np.float32)).resize((side, side), Image.BICUBIC))
    tissue = shape > np.quantile(shape, 0.5)
    cells = side // 4
    dots = np.asarray(Image.fromarray((rng.random((cells, cells)) < nuclei).astype(np.uint8) * 255)
                      .resize((side, side), Image.BILINEAR)) > 96
    colour = np.where(dots[..., None], HAEMATOXYLIN, EOSIN)
    colour = GLASS + stain * (colour - GLASS)
    image = np.where(tissue[..., None], colour, GLASS) + rng.normal(0, 10, (side, side, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_cohort(out: Path, per_label: int = 2, side: int = 512, slides_per_patient: int = 2,
                           mpp: float = 0.5, seed: int = 0) -> Path:
    """build_cohort's layout from generated tissue: `per_label` pyramidal TIFFs (write_slide_tiff) of tissue_image a
    label of SYNTHETIC_LABELS in out/slides/<label>-<i>.tif, and out/cohort.csv (slide,patient,label,source), every
    `slides_per_patient` slides of a label one patient <label>-P<n>. Returns the table's path."""
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rows, rng = [["slide", "patient", "label", "source"]], np.random.default_rng(seed)
    for label, (nuclei, stain) in SYNTHETIC_LABELS.items():
        for i in range(per_label):
            image = tissue_image(side, rng, nuclei, stain)
            file = write_slide_tiff(out / "slides" / f"{label}-{i:02d}.tif", image, mpp)
            rows.append([f"slides/{file.name}", f"{label}-P{i // slides_per_patient + 1}", label, "synthetic"])
    table = out / "cohort.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return table


def write_cohort(source: str, request: pytest.FixtureRequest, out: Path, per_label: int, side: int = 512) -> Path:
    """A cohort's slide table, `per_label` slides of `side` px a class, patients of two slides: from generated tissue
    (source "synthetic") or cut from ../shared/data/wsi ("real", build_cohort; the test skips where it is absent)."""
    if source == "synthetic":
        return write_synthetic_cohort(out, per_label=per_label, side=side)
    if source == "real":
        return build_cohort(request.getfixturevalue("wsi_dir"), out, per_source=per_label, side=side)
    raise ValueError(f"cohort source {source!r}: one of {COHORT_SOURCES}")


@pytest.fixture(scope="session")
def synthetic_slide_cohort(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slide table of 15 slides of generated tissue (512 px, 5 a class of 3), patients of two slides (the fifth
    alone): 9 patients, 3 a class. Returns the table's path."""
    return write_cohort("synthetic", request, tmp_path_factory.mktemp("synthetic-cohort"), per_label=5)


@pytest.fixture(scope="session")
def real_slide_cohort(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synthetic_slide_cohort's shape from real tissue: 5 slides cut from each slide of ../shared/data/wsi, whose
    class they take (skips where absent)."""
    return write_cohort("real", request, tmp_path_factory.mktemp("real-cohort"), per_label=5)


# ---------------------------------------------------------------- a tiny encoder

ENCODER_SIDE = 32  # px a tile goes into the tiny encoder at


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SqueezeNet 1.1 with random weights of its own (seeded), at ENCODER_SIDE px: the encoder's weights file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "squeezenet-random.pth"
    net = build_encoder({"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1", "weights": None},
                        ENCODER_SIDE)[0]
    torch.save(net.state_dict(), path)
    return path


# ---------------------------------------------------------------- tiny class folders

CLASSES = ["CLL", "FL", "MCL"]
TINTS = [(200, 120, 160), (120, 160, 200), (160, 200, 120)]  # pixels="tint": each class's mean colour


def make_images(root: Path, per_class: int = 6, size: tuple[int, int] = (80, 64), seed: int = 0, *,
                pixels: str = "noise", widths: tuple[int, ...] | None = None, digits: int = 0,
                suffix: str = ".png") -> Path:
    """RGB images in one folder per class of CLASSES, root/<class>/<class>-<i><suffix> (i zero-padded to `digits`),
    `size` (width, height) or, with widths, those widths in turn at size's height. pixels: "noise" uniform random,
    the classes alike (distinct bytes, so no accidental duplicates); "tint" noise (sd 40) around a colour per class
    (TINTS: a model tells them apart); "channel" noise in 40-120 with class k's channel k raised by 120."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], widths[i % len(widths)] if widths else size[0], 3)
            if pixels == "noise":
                image = rng.integers(0, 256, shape, dtype=np.uint8)
            elif pixels == "tint":
                image = np.clip(rng.normal(TINTS[k], 40, shape), 0, 255).astype(np.uint8)
            elif pixels == "channel":
                image = rng.integers(40, 120, shape)
                image[..., k] += 120
                image = image.astype(np.uint8)
            else:
                raise ValueError(f"pixels={pixels!r}: noise, tint or channel")
            Image.fromarray(image).save(root / c / f"{c}-{i:0{digits}d}{suffix}")
    return root


def write_cases(root: Path, per_case: int = 2, group: str = "{label}-{case}") -> Path:
    """root/cases.csv (image,label,group) for make_images' folders: every `per_case` images of a class (by index)
    are one case, named by `group` (fields label and case, the case's number within its class)."""
    rows = [["image", "label", "group"]]
    for image in sorted(p for p in root.glob("*/*") if p.is_file()):
        label, index = image.parent.name, int(image.stem.rsplit("-", 1)[1])
        rows.append([f"{label}/{image.name}", label, group.format(label=label, case=index // per_case)])
    with (root / "cases.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return root


def config(root: Path, out: Path, **over) -> dict:
    """A plain data config for make_images' folders (3 folds, 36-px patches), prepared into `out`."""
    data = {"name": "tiny", "root": str(root), "classes": CLASSES, "labels": "folder",
            "split": {"kind": "kfold", "k": 3, "val_fraction": 0.5, "seed": 0},
            "patches": {"size": 36, "stride": 32, "rotations": [0, 90]},
            "shards": {"dir": str(out), "samples_per_shard": 40, "workers": 1}}
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return data


# ---------------------------------------------------------------- configs and training runs

WANDB_SET_BY_TRAIN = ("WANDB_MODE", "WANDB_SILENT", "WANDB_CONSOLE", "WANDB_INIT_TIMEOUT")


def _no_trace(mp: pytest.MonkeyPatch) -> Iterator[None]:
    for name in WANDB_SET_BY_TRAIN:
        mp.delenv(name, raising=False)  # the monkeypatch restores them as they were
    yield
    HydraConfig.instance().cfg = None  # else Lightning would think a later test runs under Hydra


@pytest.fixture()
def leave_no_trace(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that call train(): it sets WANDB_* variables and Hydra's run config; put both back."""
    yield from _no_trace(monkeypatch)


@pytest.fixture(scope="module")
def leave_no_trace_module() -> Iterator[None]:
    """leave_no_trace for a module-scoped fixture that calls train(): both put back after the module."""
    with pytest.MonkeyPatch.context() as mp:
        yield from _no_trace(mp)


def compose_config(name: str, overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """conf/<name>.yaml with overrides, composed afresh (any earlier Hydra initialisation cleared)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def compose_train(overrides: list[str], output_dir: Path, multirun: bool = False) -> DictConfig:
    """The real train.yaml with overrides, as @hydra.main would give it to train() (hydra node removed);
    multirun: as to a job of a sweep, whose folder is output_dir. Sets Hydra's run config: use leave_no_trace."""
    cfg = compose_config("train", overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        HydraConfig().set_config(cfg)  # ${hydra:...} resolves as in a real run
        del cfg["hydra"]
    return cfg


def env_without_wandb_account(tmp: Path) -> dict[str, str]:
    """This environment for a child process with no W&B key, mode or netrc (W&B must decide offline by itself),
    unbuffered, one thread (tiny nets gain nothing from threads, and a shared CPU makes them wait)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "NETRC": str(tmp / "no-netrc"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- a local HTTP server


class LocalServer:
    """A static file server of `root` on 127.0.0.1 (a free port) that records the paths requested; url: its base."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture()
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """A LocalServer of the empty folder tmp_path/served, running for the test; no proxy comes between."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "served"
    root.mkdir()
    server = LocalServer(root)
    thread = threading.Thread(target=server.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
    thread.join()


# ---------------------------------------------------------------- figures


@pytest.fixture()
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib Figure saved while the test runs (savefig still writes the file), to read what was drawn."""
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    savefig = Figure.savefig

    def recording(self: Figure, *args: object, **kwargs: object) -> object:
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


def plotted_lines(figure) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{axes title: {line label: (x values, y values)}} of a figure's labelled lines."""
    return {ax.get_title(): {line.get_label(): ([float(x) for x in line.get_xdata()],
                                                [float(y) for y in line.get_ydata()])
                             for line in ax.lines if not line.get_label().startswith("_")}
            for ax in figure.axes}


# ---------------------------------------------------------------- W&B offline run files


def wandb_records(path: Path) -> Iterator[Any]:
    """The records (wandb_internal_pb2.Record) of an offline run's run-*.wandb file: LevelDB's log format (32 KiB
    blocks of chunks: crc32, length, type; a record's chunks FULL, or FIRST, MIDDLE..., LAST) after W&B's 7-byte
    header. wandb >= 0.20 reads these files only in its Go service; this is the reader its Python once had."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path}: not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run_summary(path: Path) -> tuple[Any, dict[str, Any]]:
    """An offline run file's run record (name, group, job_type, config) and its summary, as the last updates left
    it (top-level keys; a nested key joined by /)."""
    run, summary = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update})
    assert run is not None, f"{path}: no run record"
    return run, summary
