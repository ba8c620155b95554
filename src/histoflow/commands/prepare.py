"""Prepare the shards of a data set: `histoflow prepare data=lymphoma data.root=PATH [protocol=cases] [save_as=NAME]`.

Lists and checks every image, assigns folds (by patient where groups are given), audits the split for leaks,
cuts the patches and packs them into WebDataset shards with each fold's training statistics (histoflow.data.prepare).
`save_as=mine` keeps the data settings given as conf/data/mine.yaml in your own config folder ($HISTOFLOW_CONF,
default ./conf), so that train, embed and audit take `data=mine` instead of every data option again.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import CONF_DIR
from histoflow.common.errors import ConfigError, report_errors
from histoflow.data.loader_config import LoaderConfig
from histoflow.data.prepare import prepare_dataset

log = logging.getLogger(__name__)
USER_CONF = "HISTOFLOW_CONF"  # your own config folder (default ./conf): the configs' hydra.searchpath names it too


def changed(given: Any, base: Any) -> Any:
    """The parts of `given` that differ from `base`, nested mappings compared key by key."""
    if isinstance(given, dict) and isinstance(base, dict):
        out = {k: changed(v, base[k]) if k in base else v for k, v in given.items() if base.get(k, object()) != v}
        return {k: v for k, v in out.items() if v != {}}
    return given


def saved_data_config(cfg: DictConfig, name: str) -> tuple[Path, str]:
    """Where `save_as=name` keeps the data settings, and their text: the data config chosen (as its defaults) and
    what this command changed in it, the image folder as an absolute path. Checked before any work: a file of that
    name with other settings is never overwritten."""
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in (".yaml", ".yml"):  # conf/data/mine.yaml.yaml, then data=mine.yaml loads another file
        raise ConfigError(f"save_as={name}: the name of a data config, without {suffix}; the file is "
                          f"conf/data/<name>.yaml and train takes data=<name>. Fix: save_as={stem}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"save_as={name!r}: a name of letters, digits, '_', '-' or '.'. Fix: e.g. save_as=mine")
    choice = HydraConfig.get().runtime.choices["data"]
    base = OmegaConf.to_container(hydra.compose("prepare", overrides=[f"data={choice}"]).data, resolve=False)
    data = OmegaConf.to_container(cfg.data, resolve=False)
    if data.get("root"):
        data["root"] = str(Path(data["root"]).expanduser().resolve())  # the same folder from wherever it is used
    text = (f"# saved by `histoflow prepare ... save_as={name}`: data={name} stands for these data settings\n"
            + OmegaConf.to_yaml({"defaults": [choice, "_self_"], **changed(data, base)}))
    file = Path(os.environ.get(USER_CONF, "conf")) / "data" / f"{name}.yaml"
    if file.is_file() and file.read_text() != text:
        raise ConfigError(f"save_as={name}: {file} holds other data settings. Fix: another name, or delete that file "
                          "to save these")
    if not file.is_file() and (CONF_DIR / "data" / f"{name}.yaml").is_file():
        raise ConfigError(f"save_as={name}: histoflow has a data config of that name. Fix: another name")
    return file, text


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="prepare")
@report_errors
def main(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    # data.loader is train's and embed's, not prepare's: checked here too, so a typo fails now, not after the work
    LoaderConfig.from_config(data.get("loader"))
    saved = saved_data_config(cfg, str(cfg.save_as)) if cfg.get("save_as") else None
    prepared = prepare_dataset(data)
    if saved is not None:
        file, text = saved
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
        log.info("data settings saved in %s: from now on data=%s, e.g. histoflow train -m data=%s fold=1,2,3,4,5",
                 file, cfg.save_as, cfg.save_as)
    return str(prepared.path)


if __name__ == "__main__":
    main()
