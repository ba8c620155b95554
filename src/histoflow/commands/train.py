"""Train a patch classifier (or a head on frozen features) on one fold: `histoflow train [group=option ...]`.

    histoflow train                                    # data=lymphoma, model=alexnet32, fold 1
    histoflow train experiment=janowczyk_lymphoma -m fold=1,2,3,4,5   # all folds, then summary.md and image_report/
    histoflow train model=resnet18 optimizer=sgd scheduler=cosine trainer.max_epochs=30
    histoflow train ckpt_path=last hydra.run.dir=outputs/train/runs/<date>   # resume an interrupted run

`python train.py ...` at the checkout's root is the same command. Everything is in conf/train.yaml and its groups;
the work is done in histoflow.training.run.train.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from histoflow.common.config import CONF_DIR
from histoflow.common.errors import report_errors


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    """Train one run; return its best validation score of cfg.monitor, the value a sweeper (Optuna) optimises."""
    from histoflow.training.run import (
        train,  # Lightning's 5 s of imports after the config: --help answers at once
    )

    metrics = train(cfg)
    return metrics.get(f"{cfg.monitor}_best")


if __name__ == "__main__":
    main()
