"""Embed every prepared patch with a frozen encoder, once: `python -m histoflow.embed data=... encoder=...`.

    python -m histoflow.embed data=lymphoma data.root=PATH protocol=cases encoder=squeezenet1_1_imagenet
    python -m histoflow.embed encoder=timm encoder.name=resnet18 encoder.weights=/models/resnet18.safetensors

train.py with the same data and encoder (and a head: model=linear_head) finds these embeddings and trains on
them; it also embeds by itself when they are missing. The work is done in histoflow.data.embeddings.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from histoflow.config import localize_weights
from histoflow.data.datamodule import ShardDataModule
from histoflow.data.prepare import prepare_dataset
from histoflow.errors import report_errors

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="embed")
@report_errors
def main(cfg: DictConfig) -> str:
    localize_weights(cfg, ["encoder"])
    datamodule = ShardDataModule(encoder=cfg.encoder, **cfg.data)
    features = datamodule.embeddings(prepare_dataset(datamodule.data))
    print(f"embedded {features.record['samples']} patches into {features.dim} features each\n"
          f"  embeddings: {features.path}")
    return str(features.path)


if __name__ == "__main__":
    main()
