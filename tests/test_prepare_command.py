"""`histoflow prepare` refuses, before any work, what would silently do something else (issue 37): a `save_as` name
with the .yaml suffix (items 5), a mistyped key of data.loader (item 13); its errors shown without a traceback; a
data set named once (save_as) and found by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, make_images


def _prepare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HISTOFLOW_WORK": str(tmp_path / "work"), "WANDB_MODE": "disabled"}
    env.pop("HISTOFLOW_CONF", None)
    return subprocess.run([sys.executable, "-m", "histoflow", "prepare", "data.root=images", "data.classes=null",
                           "data.split.k=2", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_save_as_with_the_yaml_suffix_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "images", per_class=4)
    run = _prepare(tmp_path, "save_as=mine.yaml")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "save_as=mine.yaml: the name of a data config, without .yaml" in run.stderr
    assert "Fix: save_as=mine" in run.stderr
    assert not (tmp_path / "conf").exists() and not (tmp_path / "work").exists()  # refused before any work


def test_an_unknown_loader_key_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "images", per_class=4)
    run = _prepare(tmp_path, "+data.loader.cropp=3")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "data.loader.cropp: unknown key(s)" in run.stderr and "crop" in run.stderr
    assert not (tmp_path / "work").exists()


def test_the_entry_points_print_their_own_errors_without_a_traceback(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "histoflow", "prepare", "data=lymphoma",
                          f"data.root={tmp_path / 'typo'}", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 1
    assert f"data.root={tmp_path / 'typo'}" in run.stderr and "Traceback" not in run.stderr + run.stdout



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
