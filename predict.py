"""Predict whole images by patch voting: `python predict.py ckpt_path=<.ckpt | run | multirun> [images=...]`.

    python predict.py ckpt_path=outputs/train/multirun/<date>             # k-fold report on held-out images
    python predict.py ckpt_path=<run>/checkpoints/<best>.ckpt images=dir/  # predictions.csv, no labels needed
    python predict.py ckpt_path=... aggregate=mean tta=true grid.stride=16
    python predict.py ckpt_path=[<multirun>,<multirun>]                    # each fold's models averaged

Everything is in conf/predict.yaml; the work is done in histoflow.inference.predict.predict.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from histoflow.errors import report_errors
from histoflow.inference.predict import predict


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="predict")
@report_errors
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
