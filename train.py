"""Train a patch classifier on one fold: `python train.py [experiment=...] [fold=k] [group=option ...]`.

    python train.py                                    # data=lymphoma, model=alexnet32, fold 1
    python train.py experiment=janowczyk_lymphoma -m fold=1,2,3,4,5   # all folds, then summary.md
    python train.py model=resnet18 optimizer=sgd scheduler=cosine trainer.max_epochs=30
    python train.py ckpt_path=last hydra.run.dir=outputs/train/runs/<date>   # resume an interrupted run
    python train.py -m ckpt_path=last hydra.sweep.dir=outputs/train/multirun/<date> fold=1,2,3   # ... a multirun

Everything is in conf/ (train.yaml and its groups); the work is done in histoflow.training.train.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from histoflow.errors import report_errors
from histoflow.training import train


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    """Train one run; return its best validation score of cfg.monitor, the value a sweeper (Optuna) optimises."""
    metrics = train(cfg)
    return metrics.get(f"{cfg.monitor}_best")


if __name__ == "__main__":
    main()
