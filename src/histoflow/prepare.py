"""Prepare shards: `python -m histoflow.prepare data=lymphoma data.root=PATH`."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from histoflow.data.prepare import prepare_dataset
from histoflow.errors import report_errors

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
@report_errors
def main(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return str(prepare_dataset(data).path)


if __name__ == "__main__":
    main()
