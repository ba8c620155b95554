"""Faults a new user hits while preparing data: concurrent prepares, changed images, a mistyped root, links,
a full disk, one class, typo keys, and how the entry points show the project's own errors."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, REPO, config, make_images
from filelock import FileLock

from histoflow.common.errors import (
    ConfigError,
    DamagedFileError,
    HistoflowError,
    MissingInputError,
    message,
)
from histoflow.data import shards
from histoflow.data.loader_config import LoaderConfig
from histoflow.data.locks import only_writer
from histoflow.data.prepare import prepare_dataset
from histoflow.data.problems import FIXES, BadInputError
from histoflow.data.sources import SourceConfig, list_images


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under a prepared folder but its timing record, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "dataset.json" and not p.name.startswith(".")}


def test_concurrent_prepares_all_succeed_and_equal_a_clean_run(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=20, size=(320, 256))
    data = config(root, tmp_path / "shared", shards={"samples_per_shard": 16})
    script = f"from histoflow.data.prepare import prepare_dataset; prepare_dataset({data!r}, quiet=True)"
    procs, t0 = [], time.monotonic()
    for delay in (0.0, 0.2, 0.5, 1.0):  # the fold jobs of a sweep, started by a launcher moments apart
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        procs.append(subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outputs)
    clean = prepare_dataset(config(root, tmp_path / "clean", shards={"samples_per_shard": 16}), quiet=True)
    folders = [f for f in (tmp_path / "shared").iterdir() if not f.name.startswith(".")]
    assert [f.name for f in folders] == [clean.path.name]
    assert _tree(folders[0]) == _tree(clean.path)
    assert not list(folders[0].glob("shards/.*.tmp"))


def _tiff_images(root: Path) -> Path:
    """Uncompressed TIFFs: every image of the same size has the same number of bytes, like Kather's tiles."""
    return make_images(root, per_class=4, size=(80, 64), seed=1, suffix=".tif")


def test_same_size_replacement_gives_a_new_folder_and_the_checks_run(tmp_path: Path) -> None:
    root = _tiff_images(tmp_path / "images")
    first = prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    target, other = root / "CLL" / "CLL-0.tif", root / "FL" / "FL-0.tif"
    before = target.stat()
    target.write_bytes(other.read_bytes())  # same size, other pixels: an FL image filed as CLL
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or rsync keep the old time
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(BadInputError, match="conflicting-labels"):  # the duplicate check ran on the new bytes
        prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    again = prepare_dataset(config(root, tmp_path / "prepared", on_bad_image="skip"), quiet=True)
    assert again.path != first.path and again.record["images"] == first.record["images"] - 2


def test_unchanged_images_are_not_hashed_again(tmp_path: Path, monkeypatch) -> None:
    from histoflow.data import fingerprint

    monkeypatch.setattr(fingerprint, "RACY_S", 0.0)  # else an image changed in the last 2 s is hashed again
    root = make_images(tmp_path / "images")
    data = config(root, tmp_path / "prepared")
    first = prepare_dataset(data, quiet=True)
    hashed, real = [], fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert prepare_dataset(data, quiet=True).path == first.path
    assert hashed == []
    (root / "FL" / "FL-1.png").touch()  # a new status: read again, the same bytes, the same folder
    assert prepare_dataset(data, quiet=True).path == first.path
    assert hashed == ["FL-1.png"]


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_mistyped_root_is_an_error_never_a_download(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "lymphoma-typo"
    if kind == "file":
        root.write_text("not a folder")
    data = config(root, tmp_path / "prepared", url="http://127.0.0.1:9/never-asked.tar.gz",
                  cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MissingInputError, match=f"data.root={root}") as error:
        prepare_dataset(data, quiet=True)
    assert "predict.py: +data.root=" in str(error.value)  # issue 29: predict's data section starts empty
    assert not (tmp_path / "cache").exists()


def test_linked_folders_inside_a_class_are_followed_once(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=2)
    extra = make_images(tmp_path / "elsewhere", per_class=3, seed=1)
    (root / "CLL" / "more").symlink_to(extra / "CLL", target_is_directory=True)
    (root / "CLL" / "loop").symlink_to(root / "CLL", target_is_directory=True)  # must not recurse forever
    records, problems = list_images(SourceConfig(classes=CLASSES), root)
    cll = sorted(r.path for r in records if r.label == "CLL")
    assert cll == ["CLL/CLL-0.png", "CLL/CLL-1.png", "CLL/more/CLL-0.png", "CLL/more/CLL-1.png",
                   "CLL/more/CLL-2.png"]
    assert problems == []


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("batch_size", "abc"), ("eval_batch_size", -1),
                                       ("num_workers", -2), ("shuffle_buffer", 1.5), ("crop", 0)])
def test_loader_values_are_checked_up_front(key: str, value) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"data.loader.{key}={value!r}")):
        LoaderConfig.from_config({key: value})


@pytest.mark.parametrize("over,key", [({"split": {"kk": 3}}, "data.split.kk"),
                                      ({"patches": {"strid": 16}}, "data.patches.strid"),
                                      ({"shards": {"sample_per_shard": 9}}, "data.shards.sample_per_shard"),
                                      ({"lables": "csv"}, "data.lables")])
def test_unknown_keys_are_refused_with_their_full_name(tmp_path: Path, over: dict, key: str) -> None:
    root = make_images(tmp_path / "images", per_class=2)
    with pytest.raises(ConfigError, match=re.escape(key)):
        prepare_dataset(config(root, tmp_path / "prepared", **over), quiet=True)


def test_a_full_disk_names_the_folder_and_leaves_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    root = make_images(tmp_path / "images")
    add, calls = shards.TarShard.add, []

    def fill_up(self, name: str, data: bytes) -> None:
        calls.append(name)
        if len(calls) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        add(self, name, data)

    monkeypatch.setattr(shards.TarShard, "add", fill_up)
    with pytest.raises(HistoflowError, match="no space left") as info:
        prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    shard_dir = next((tmp_path / "prepared").iterdir()) / "shards"
    assert str(shard_dir) in str(info.value) and "data.shards.dir" in str(info.value)
    assert list(shard_dir.glob(".*")) == []
    monkeypatch.setattr(shards.TarShard, "add", add)  # space freed: the run resumes
    assert prepare_dataset(config(root, tmp_path / "prepared"), quiet=True).record["images"] == 18


def test_one_class_is_an_error_at_prepare(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=3)
    for c in CLASSES[1:]:
        for p in (root / c).iterdir():
            p.unlink()
        (root / c).rmdir()
    with pytest.raises(ConfigError, match="one class"):
        prepare_dataset(config(root, tmp_path / "prepared", classes=None), quiet=True)


def test_the_entry_points_print_their_own_errors_without_a_traceback(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "histoflow", "prepare", "data=lymphoma",
                          f"data.root={tmp_path / 'typo'}", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 1
    assert f"data.root={tmp_path / 'typo'}" in run.stderr and "Traceback" not in run.stderr + run.stdout


class _DamagedShards(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise DamagedFileError("shard 1-fit-00000.tar: truncated member. Fix: delete the shard and re-run prepare")
        yield


def test_an_error_of_a_loader_worker_is_shown_without_the_worker_traceback() -> None:
    with pytest.raises(DamagedFileError) as info:
        list(torch.utils.data.DataLoader(_DamagedShards(), num_workers=1))
    assert "Traceback" in str(info.value)  # what torch re-raises
    assert message(info.value) == "shard 1-fit-00000.tar: truncated member. Fix: delete the shard and re-run prepare"


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_prepare_writes_a_damaged_or_missing_shard_again(tmp_path: Path, damage: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29.3: the loader's fix for a damaged shard is to re-run prepare, which once found the folder prepared,
    rewrote nothing, and left train and embed to a FileNotFoundError traceback."""
    root = make_images(tmp_path / "images", per_class=6, size=(96, 80))
    data = config(root, tmp_path / "prepared", shards={"samples_per_shard": 16})
    first = prepare_dataset(data, quiet=True)
    before = _tree(first.path)
    shard = first.path / "shards" / first.record["shards"][1]["file"]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1500])
        with pytest.raises(DamagedFileError, match="re-run prepare"):
            list(shards.tar_samples([{"url": str(shard)}]))
    else:
        shard.unlink()
    again = prepare_dataset(data, quiet=True)
    assert again.path == first.path and _tree(again.path) == before  # the same bytes as the first run wrote
    assert shard.name in caplog.text and "writing them again" in caplog.text
    assert len(list(shards.tar_samples([{"url": str(shard)}]))) == first.record["shards"][1]["samples"]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for PID 1, which may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_pool_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    """Issue 29.4: `kill -9` of a running prepare left its two pool workers (~400 MB each) asleep forever."""
    script = f"""
import os, sys, time
from pathlib import Path
from histoflow.common.progress import process_map
def task(i):
    Path({str(tmp_path)!r}, f"worker-{{os.getpid()}}").touch()
    time.sleep(120)
list(process_map(task, [0, 1], 2))
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


def _groups_table(root: Path, rows: list[list[str]], bom: bool = False) -> str:
    with (root / "patients.csv").open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write("image,group\n" + "".join(",".join(row) + "\n" for row in rows))
    return "patients.csv"


def _every_image(root: Path) -> list[list[str]]:
    """Each image its patient: <class>-<index // 2> (two images a patient, one class each)."""
    return [[f"{p.parent.name}/{p.name}", f"{p.parent.name}-{int(p.stem.rsplit('-', 1)[1]) // 2}"]
            for p in sorted(root.glob("*/*.png"))]


def test_a_patient_table_saved_by_excel_reads(tmp_path: Path) -> None:
    """Issue 29.5: Excel's "CSV UTF-8" starts with a byte-order mark, once read as a column '\\ufeffimage'."""
    root = make_images(tmp_path / "images", per_class=4)
    cfg = SourceConfig(classes=CLASSES, groups=_groups_table(root, _every_image(root), bom=True))
    records, problems = list_images(cfg, root)
    assert not problems and {r.group for r in records} == {f"{c}-{i}" for c in CLASSES for i in (0, 1)}


def test_an_image_under_two_patients_is_refused(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    rows = _every_image(root) + [["FL/FL-0.png", "FL-1"]]  # the last row once won in silence
    with pytest.raises(ConfigError, match=r"1 image\(s\) listed under two patients: FL/FL-0.png \('FL-0' and 'FL-1'\)"):
        list_images(SourceConfig(classes=CLASSES, groups=_groups_table(root, rows)), root)


def test_a_patient_of_two_classes_is_refused_where_labels_belong_to_patients(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    rows = [[image, "P1" if image in ("CLL/CLL-0.png", "FL/FL-0.png") else group] for image, group in _every_image(root)]
    table = _groups_table(root, rows)
    with pytest.raises(ConfigError, match=r"1 patient\(s\) hold images of two or more classes: P1 \(CLL, FL\)"):
        list_images(SourceConfig(classes=CLASSES, groups=table, patient_labels=True), root)
    records, problems = list_images(SourceConfig(classes=CLASSES, groups=table), root)  # tissue types: allowed
    assert not problems and {r.label for r in records if r.group == "P1"} == {"CLL", "FL"}


def test_table_rows_for_absent_files_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    rows = _every_image(root) + [["MCL/MCL-9.png", "MCL-4"]]
    records, problems = list_images(SourceConfig(classes=CLASSES, groups=_groups_table(root, rows)), root)
    assert len(records) == 12 and not problems
    assert "1 row(s) name files that are not under" in caplog.text and "MCL/MCL-9.png" in caplog.text


def test_an_image_copied_under_another_patient_merges_them_with_a_log_line(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    (root / "CLL" / "CLL-3.png").write_bytes((root / "CLL" / "CLL-0.png").read_bytes())  # patients CLL-0 and CLL-1
    data = config(root, tmp_path / "prepared", groups=_groups_table(root, _every_image(root)))
    prepared = prepare_dataset(data, quiet=True)
    assert "CLL/CLL-0.png (patient CLL-0) and CLL/CLL-3.png (patient CLL-1) are the same image" in caplog.text
    folds = {row["image"]: row["fold"] for row in prepared.manifest()}
    assert folds["CLL/CLL-0.png"] == folds["CLL/CLL-1.png"] == folds["CLL/CLL-2.png"] == folds["CLL/CLL-3.png"]


@pytest.mark.parametrize("over, message", [
    ({"patches": {"stride": 0}}, "data.patches.stride=0: must be at least 1"),
    ({"patches": {"stride": -4}}, "data.patches.stride=-4: must be at least 1"),
    ({"patches": {"size": 0}}, "data.patches.size=0: must be at least 1"),
    ({"patches": {"rotations": [45]}}, "only multiples of 90 degrees"),
    ({"split": {"k": 1}}, "data.split.k=1: must be at least 2"),
    ({"split": {"val_fraction": 1.0}}, "data.split.val_fraction=1.0"),
    ({"split": {"kind": "fractions", "fractions": {"train": 0.5, "test": 0.6}}}, "adding up to 1"),
    ({"patches": {"size": 5000}}, "too-small"),    # known only once the images are read
    ({"split": {"k": 20}}, "data.split.k"),        # more folds than patients
])
def test_refused_values_leave_no_folder(tmp_path: Path, over: dict, message: str) -> None:
    """Issue 29.6: stride 0 or -4, size 0 and k=1 ended in tracebacks with a half-written prepared folder, and values
    refused cleanly still left empty folders."""
    root = make_images(tmp_path / "images", per_class=4)
    with pytest.raises(HistoflowError, match=re.escape(message)):
        prepare_dataset(config(root, tmp_path / "prepared", **over), quiet=True)
    prepared = tmp_path / "prepared"
    assert not prepared.exists() or not [p.name for p in prepared.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("key, value", [("stride", -5), ("stride", 0), ("size", 0)])
def test_a_prediction_grid_below_one_pixel_is_refused(key: str, value: int) -> None:
    """Issue 29.6: grid.stride=-5 ran (4,312 patches an image) and grid.stride=0 silently became 32."""
    from types import SimpleNamespace

    from histoflow.inference.predict import prediction_grid

    model = SimpleNamespace(config={"data": {"patches": {"size": 36, "stride": 32}}})
    with pytest.raises(ConfigError, match=f"grid.{key}={value}: must be at least 1"):
        prediction_grid({key: value}, model)
    assert prediction_grid({"stride": 16}, model).stride == 16 and prediction_grid({}, model).stride == 32


def test_a_mistyped_top_level_key_is_refused(tmp_path: Path, leave_no_trace: None) -> None:
    """Issue 29: `+seeed=3` on train and `+aggregat=mean` on predict were ignored, exit 0."""
    from conftest import compose_config, compose_train

    from histoflow.common.config import refuse_unknown_top_keys
    from histoflow.inference.predict import predict
    from histoflow.training.run import train

    with pytest.raises(ConfigError, match="seeed: unknown top-level key"):
        train(compose_train(["+seeed=3"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="aggregat: unknown top-level key"):
        predict(compose_config("predict", ["ckpt_path=x", "+aggregat=mean"]))
    for experiment in ("janowczyk_lymphoma", "lymphoma_frozen_squeezenet", "kather_transfer"):  # every real key passes
        refuse_unknown_top_keys(compose_config("train", [f"experiment={experiment}", "trainer=gpu"]), "train")


def test_an_encoder_under_a_net_of_patches_is_refused_before_any_work(tmp_path: Path, leave_no_trace: None) -> None:
    """Issue 29: `encoder=squeezenet1_1_imagenet model=alexnet32` embedded everything, then died in conv2d."""
    from conftest import compose_train

    from histoflow.training.run import train

    root = make_images(tmp_path / "images", per_class=4)
    cfg = compose_train(["encoder=squeezenet1_1_imagenet", "model=alexnet32", f"data.root={root}",
                         f"paths.data_dir={tmp_path / 'work'}", "logger=csv"], tmp_path / "run")
    with pytest.raises(ConfigError, match="model=linear_head or model=mlp_head"):
        train(cfg)
    assert not (tmp_path / "work").exists()


def test_prediction_inputs_are_named_right(tmp_path: Path) -> None:
    """Issue 29: `tta=maybe` became the views m, a, y, b, e; a missing folder was 'no image files found there';
    `slides=/missing` spoke of images=; slides and images together left the images out in silence."""
    from conftest import compose_config

    from histoflow.inference.predict import files_matching, predict
    from histoflow.inference.voting import tta_views

    with pytest.raises(ConfigError, match="tta='maybe': expected true, false or a list"):
        tta_views("maybe")
    with pytest.raises(MissingInputError, match="images=/nonexistent/x: no such file or folder"):
        files_matching("/nonexistent/x")
    with pytest.raises(MissingInputError, match=r"slides=/missing: no such file or folder"):
        files_matching("/missing", (".svs",), key="slides")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match=r"slides=.*empty: no slide files \(.svs\) found there.*'dir/\*.svs'"):
        files_matching(str(tmp_path / "empty"), (".svs",), key="slides")
    cfg = compose_config("predict", ["ckpt_path=x", "slides=a.svs", "images=b"])
    with pytest.raises(ConfigError, match="one run predicts slides or images"):
        predict(cfg)


def test_a_sweep_over_folds_the_data_lack_is_refused_before_its_first_job(tmp_path: Path) -> None:
    """Issue 29: `train.py -m fold=1,6` trained fold 1, then refused 6 and wrote no summary."""
    root = make_images(tmp_path / "images", per_class=4)
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "fold=1,6", f"data.root={root}",
                          f"paths.data_dir={tmp_path / 'work'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "logger=csv"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
    assert run.returncode == 1
    assert "fold=6: not folds of data.split (kind=kfold, k=5). Fix: sweep over 1,2,3,4,5" in run.stdout + run.stderr
    assert not (tmp_path / "work").exists() and not list((tmp_path / "sweep").glob("[0-9]*"))


def test_user_errors_of_predict_and_embed_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29: predict without ckpt_path, device=cuda without CUDA, embedding into a read-only prepared folder:
    each a traceback once."""
    from conftest import compose_config

    from histoflow.common.errors import NotWritableError
    from histoflow.common.machine import resolve_device
    from histoflow.features.embeddings import embed_dataset
    from histoflow.inference.predict import predict

    with pytest.raises(ConfigError, match="ckpt_path is needed"):
        predict(compose_config("predict", ["images=somewhere"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda: no such CUDA device here"):
            predict(compose_config("predict", ["ckpt_path=x", "device=cuda"]))
    with pytest.raises(ConfigError, match="slide.device=cuda:7: no such CUDA device"):
        resolve_device("cuda:7", "slide.device")
    root = make_images(tmp_path / "images", per_class=4)
    prepared = prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)

    def refused(self: Path, *args, **kwargs) -> None:  # a read-only folder (chmod does not stop root, who runs CI)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "touch", refused)
    with pytest.raises(NotWritableError, match="cannot write the embeddings here \\(Permission denied\\)"):
        embed_dataset(prepared, {"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1",
                                 "weights": None}, {"crop": 32, "normalize": "imagenet"}, progress=False)


def test_an_encoders_errors_name_the_encoder_keys(tmp_path: Path) -> None:
    """Issue 29: an offline or mistyped `encoder=timm` named model.name / model.weights, the head's keys."""
    from histoflow.models import build_encoder

    with pytest.raises(MissingInputError, match=r"^encoder.weights file '/nonexistent/w.pth' does not exist"):
        build_encoder({"_target_": "histoflow.models.timm_model", "name": "resnet18",
                       "weights": "/nonexistent/w.pth"}, 64)
    with pytest.raises(ConfigError, match=r"^encoder.name=no_such_net_xyz"):
        build_encoder({"_target_": "histoflow.models.timm_model", "name": "no_such_net_xyz"}, 64)


def test_the_empty_class_folder_fix_works(tmp_path: Path) -> None:
    """Issue 29: an empty class folder suggested data.classes=[...] without it, which still failed on that folder."""
    root = make_images(tmp_path / "images", per_class=4)
    (root / "EMPTY").mkdir()
    records, problems = list_images(SourceConfig(), root)
    assert [p.kind for p in problems] == ["empty-class"] and "data.classes" in FIXES["empty-class"]
    records, problems = list_images(SourceConfig(classes=CLASSES), root)
    assert not problems and {r.label for r in records} == set(CLASSES)


@pytest.mark.parametrize("override, text", [
    ("data.loader.batch_size=0", "Error: data.loader.batch_size=0"),
    ("+model.dropoutt=0.5", "Error: histoflow.models.alexnet32.AlexNet32 takes no argument 'dropoutt'"),
])
def test_errors_inside_hydras_instantiate_are_one_line(tmp_path: Path, override: str, text: str) -> None:
    """Issue 29: Hydra's "Error executing job" and "Error in call to target" wrapped histoflow's own messages."""
    root = make_images(tmp_path / "images", per_class=4)
    run = subprocess.run([sys.executable, str(REPO / "train.py"), override, f"data.root={root}",
                          f"paths.data_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run'}", "logger=csv",
                          "data.split.k=2", "data.split.val_fraction=0",
                          "trainer.max_epochs=1", "test=false"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
    assert run.returncode == 1 and text in run.stderr, run.stderr[-2000:]
    assert "Error in call to target" not in run.stderr and "Traceback" not in run.stderr
    assert "Error executing job" not in run.stderr


def test_the_leak_audit_with_groups_given_says_they_do_not_look_like_patients(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29: with patients given, the audit still said "give the patients (data.groups=...)"."""
    root = make_images(tmp_path / "images", per_class=6, size=(96, 80))
    without = prepare_dataset(config(root, tmp_path / "a"), quiet=True)
    assert "leaky" in caplog.text and "give the patients" in caplog.text  # these images look alike across folds
    caplog.clear()
    prepare_dataset(config(root, tmp_path / "b", groups=_groups_table(root, _every_image(root))), quiet=True)
    assert "leaky" in caplog.text and "groups given do not look like patients" in caplog.text
    assert "give the patients" not in caplog.text and without.record["images"] == 18


def test_small_data_warns_once_about_validation_and_about_one_patient_folds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29: five near-identical validation-split warnings; a test fold of a single patient got none."""
    root = make_images(tmp_path / "images", per_class=6)  # 3 classes x 2 patients of 3 images: 6 patients, 5 folds
    rows = [[f"{p.parent.name}/{p.name}", f"{p.parent.name}-{int(p.stem.rsplit('-', 1)[1]) // 3}"]
            for p in sorted(root.glob("*/*.png"))]
    data = config(root, tmp_path / "p", groups=_groups_table(root, rows), split={"k": 5, "val_fraction": 0.5})
    prepared = prepare_dataset(data, quiet=True)
    validation = [r for r in caplog.records if "validation split lacks a class" in r.getMessage()]
    assert len(validation) == 1 and validation[0].getMessage().count("fold ") >= 2
    patients: dict[str, set[str]] = {}
    for row in prepared.manifest():
        patients.setdefault(row["fold"], set()).add(row["group"])
    lone = sorted(fold for fold, held in patients.items() if len(held) == 1)
    assert lone and f"fold(s) {', '.join(lone)} hold a single group (patient) each" in caplog.text


@pytest.mark.parametrize("command", ["train", "predict"])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path, command: str) -> None:
    """Issue 29: a read-only hydra.run.dir ended in Hydra's mkdir traceback (train and predict)."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    run = subprocess.run([sys.executable, "-m", "histoflow", command, f"hydra.run.dir={blocked / 'run'}",
                          f"ckpt_path={tmp_path / 'none.ckpt'}", f"paths.data_dir={tmp_path / 'work'}"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"})
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert f"{blocked / 'run'}: cannot write this run's outputs here" in run.stderr
    assert "Fix: set hydra.run.dir to a folder you can write" in run.stderr


def test_the_slurm_launcher_away_from_a_cluster_is_one_line(tmp_path: Path) -> None:
    """Issue 29: `hydra/launcher=slurm` where there is no SLURM ended in submitit's traceback."""
    bare = tmp_path / "bin"  # a PATH without sbatch, whatever this machine has
    bare.mkdir()
    root = make_images(tmp_path / "images", per_class=4)
    run = subprocess.run([sys.executable, "-m", "histoflow", "train", "-m", "hydra/launcher=slurm", "fold=1",
                          f"data.root={root}", f"paths.data_dir={tmp_path / 'work'}",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PATH": str(bare), "WANDB_MODE": "disabled"})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "hydra/launcher=slurm: this machine has no SLURM (no sbatch command)" in run.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "sweep").exists()


def test_a_data_set_is_named_once_and_found_by_name(tmp_path: Path) -> None:
    """Issue 29: prepare, train, embed and audit each needed every data option again; `save_as=NAME` keeps them
    as conf/data/NAME.yaml in the user's config folder, and `data=NAME` finds the same prepared data."""
    make_images(tmp_path / "images", per_class=4)
    env = {**os.environ, "HISTOFLOW_WORK": str(tmp_path / "work"), "WANDB_MODE": "disabled"}
    env.pop("HISTOFLOW_CONF", None)

    def histoflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "histoflow", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)

    first = histoflow("prepare", "data.root=images", "data.name=mine", "data.classes=null", "data.split.k=2",
                      "save_as=mine")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (tmp_path / "conf" / "data" / "mine.yaml").read_text()
    assert f"root: {tmp_path / 'images'}" in saved and "classes: null" in saved and "k: 2" in saved
    assert "batch_size" not in saved  # only what the command changed; the rest comes from data=lymphoma
    again = histoflow("prepare", "data=mine")
    assert again.returncode == 0 and "prepared data found" in again.stdout + again.stderr
    assert len([d for d in (tmp_path / "work" / "prepared").iterdir() if d.is_dir()]) == 1
    composed = histoflow("train", "data=mine", "--cfg", "job")
    assert composed.returncode == 0 and f"root: {tmp_path / 'images'}" in composed.stdout
    other = histoflow("prepare", "data.root=images", "data.name=mine", "data.classes=null", "save_as=mine")
    assert other.returncode == 1 and "holds other data settings. Fix: another name" in other.stderr
    shipped = histoflow("prepare", "data.root=images", "data.classes=null", "data.split.k=2", "save_as=kather")
    assert shipped.returncode == 1 and "histoflow has a data config of that name" in shipped.stderr


def test_a_second_writer_says_it_waits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29: a second concurrent embed waited ~45 s for the first without a word."""
    lock_file = tmp_path / ".embed.lock"
    held = FileLock(lock_file)
    held.acquire()
    done = threading.Event()

    def second() -> None:
        with only_writer(lock_file, f"embeds into {tmp_path}"):
            done.set()

    waiter = threading.Thread(target=second)
    with caplog.at_level("INFO", logger="histoflow.data.locks"):
        waiter.start()
        while not caplog.records and waiter.is_alive():
            waiter.join(0.05)
        assert not done.is_set()  # it waits for the holder ...
        held.release()
        waiter.join(30)
    assert done.is_set()  # ... and goes on once it is gone, having said so
    assert f"waiting for another process that embeds into {tmp_path}" in caplog.text
