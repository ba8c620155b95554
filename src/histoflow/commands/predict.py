"""Predict whole images by patch voting, or whole slides: `histoflow predict ckpt_path=<.ckpt | run | multirun>`.

    histoflow predict ckpt_path=outputs/train/multirun/<date>             # k-fold report on held-out images
    histoflow predict ckpt_path=<run>/checkpoints/<best>.ckpt images=dir/  # predictions.csv, no labels needed
    histoflow predict ckpt_path=... aggregate=mean tta=true grid.stride=16
    histoflow predict ckpt_path=[<multirun>,<multirun>]                    # each fold's models averaged
    histoflow predict ckpt_path=<slides_abmil multirun> slides=new.csv      # a bag model on a new cohort

`python predict.py ...` at the checkout's root is the same command. Everything is in conf/predict.yaml; the work
is done in histoflow.deployment.deploy.predict.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from histoflow.common.config import CONF_DIR
from histoflow.common.errors import report_errors


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
@report_errors
def main(cfg: DictConfig) -> None:
    from histoflow.deployment.deploy import (
        predict,  # torch and Lightning after the config: --help answers at once
    )

    predict(cfg)


if __name__ == "__main__":
    main()
