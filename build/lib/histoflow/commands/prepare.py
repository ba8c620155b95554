"""Prepare the shards of a data set: `histoflow prepare data=lymphoma data.root=PATH [protocol=cases]`.

Lists and checks every image, assigns folds (by patient where groups are given), audits the split for leaks,
cuts the patches and packs them into WebDataset shards with each fold's training statistics (histoflow.data.prepare).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import CONF_DIR
from histoflow.common.errors import report_errors
from histoflow.data.prepare import prepare_dataset


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="prepare")
@report_errors
def main(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return str(prepare_dataset(data).path)


if __name__ == "__main__":
    main()
