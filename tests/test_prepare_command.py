"""`histoflow prepare` refuses, before any work, what would silently do something else (issue 37): a `save_as` name
with the .yaml suffix (items 5), a mistyped key of data.loader (item 13)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_images


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
