"""Embed every prepared patch with a frozen encoder, once: `histoflow embed data=... encoder=...`.

    histoflow embed data=lymphoma data.root=PATH protocol=cases encoder=squeezenet1_1_imagenet
    histoflow embed encoder=timm encoder.name=resnet18 encoder.weights=/models/resnet18.safetensors

train.py with the same data and encoder (and a head: model=linear_head) finds these embeddings and trains on
them; it also embeds by itself when they are missing. The work is done in histoflow.features.embeddings.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from histoflow.common.config import CONF_DIR, localize_weights
from histoflow.common.errors import report_errors
from histoflow.data.prepare import prepare_dataset


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="embed")
@report_errors
def main(cfg: DictConfig) -> str:
    from histoflow.features.embeddings import (
        encoder_datamodule,  # torch after the config: --help answers at once
    )

    localize_weights(cfg, ["encoder"])
    datamodule = encoder_datamodule(cfg.encoder, **cfg.data)
    features = datamodule.embeddings(prepare_dataset(datamodule.data))
    print(f"embedded {features.record['samples']} patches into {features.dim} features each\n"
          f"  embeddings: {features.path}")
    return str(features.path)


if __name__ == "__main__":
    main()
