"""Embed with a frozen encoder, once: every prepared patch (`histoflow embed data=... encoder=...`), or every tissue
tile of the slides of a slide table (`histoflow embed slides=<table.csv> encoder=...`, docs/cohorts.md).

    histoflow embed data=lymphoma data.root=PATH protocol=cases encoder=squeezenet1_1_imagenet
    histoflow embed encoder=timm encoder.name=resnet18 encoder.weights=/models/resnet18.safetensors
    histoflow embed slides=cohort.csv encoder=timm encoder.name=hf-hub:MahmoodLab/UNI slide.mpp=0.5 slide.tile_size=224
    histoflow embed -m slides=cohort.csv embed.chunk=1/4,2/4,3/4,4/4 hydra/launcher=slurm   # four SLURM jobs

train.py with the same data and encoder (and a head: model=linear_head) finds the patches' embeddings and trains on
them; it also embeds by itself when they are missing. The work is done in histoflow.features.embeddings (patches)
and histoflow.features.cohort (slides; docs/cohorts.md names the modules it launches).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from histoflow.common.config import CONF_DIR, localize_weights, to_builtin
from histoflow.common.errors import report_errors
from histoflow.data.prepare import prepare_dataset


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="embed")
@report_errors
def main(cfg: DictConfig) -> str:
    localize_weights(cfg, ["encoder"])
    if cfg.get("slides") is not None:
        return embed_slides(cfg)
    from histoflow.features.embeddings import (
        encoder_datamodule,  # torch after the config: --help answers at once
    )

    datamodule = encoder_datamodule(cfg.encoder, **cfg.data)
    features = datamodule.embeddings(prepare_dataset(datamodule.data))
    print(f"embedded {features.record['samples']} patches into {features.dim} features each\n"
          f"  embeddings: {features.path}")
    return str(features.path)


def embed_slides(cfg: DictConfig) -> str:
    from histoflow.features.cohort import embed_cohort  # torch and Lightning after the config

    result = embed_cohort(str(cfg.slides), to_builtin(cfg.encoder), to_builtin(cfg.slide), to_builtin(cfg.embed),
                          str(cfg.on_bad_image))
    if result is None or result.rank != 0:  # a further device's process (embed.strategy=ddp): rank 0 reports
        return ""
    total = result.chunk
    done = (f"{total['embedded']} slides embedded ({total['tiles']} tiles; {result.tiles_per_s:.0f} tiles/s "
            f"on rank 0), {total['reused']} found done, {total['left_out']} left out")
    where = (f"  index: {result.index}" if result.index is not None else
             f"  features: {result.folder} (the index is written once every chunk of embed.chunk is done)")
    print(f"{done}\n{where}")
    return str(result.index or result.folder)


if __name__ == "__main__":
    main()
