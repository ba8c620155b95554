"""`histoflow train` refuses a user's mistakes in one line, before any work: an encoder under a net of patches,
folds the data lack, errors inside Hydra's instantiate, an output folder that cannot be made (train and predict),
the SLURM launcher away from a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_images

from histoflow.common.errors import ConfigError


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



def test_a_sweep_over_folds_the_data_lack_is_refused_before_its_first_job(tmp_path: Path) -> None:
    """Issue 29: `train.py -m fold=1,6` trained fold 1, then refused 6 and wrote no summary."""
    root = make_images(tmp_path / "images", per_class=4)
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "fold=1,6", f"data.root={root}",
                          f"paths.data_dir={tmp_path / 'work'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "logger=csv"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"})
    assert run.returncode == 1
    assert "fold=6: not folds of data.split (kind=kfold, k=5). Fix: sweep over 1,2,3,4,5" in run.stdout + run.stderr
    assert not (tmp_path / "work").exists() and not list((tmp_path / "sweep").glob("[0-9]*"))



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
