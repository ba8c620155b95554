"""The leak audit of a data set's folds: `histoflow audit data=lymphoma data.root=PATH [protocol=cases|blocks|images]`.

Prepares the data where needed (the audit's descriptors are saved by prepare), then writes audit.md, audit.json
and audit.png into the run's folder (histoflow.data.audit says what is checked).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import CONF_DIR
from histoflow.common.errors import report_errors
from histoflow.data.audit import (
    DESCRIPTORS,
    AuditResult,
    audit,
    describe,
    summary_line,
    write_report,
)
from histoflow.data.images import read_rgb
from histoflow.data.manifest import read_manifest
from histoflow.data.prepare import prepare_dataset


def audit_prepared(path: Path, out: Path | None = None) -> tuple[AuditResult, Path]:
    """Audit a prepared data set from its manifest and the descriptors prepare saved; report into `out`
    (default: the prepared folder)."""
    rows = read_manifest(path / "manifest.csv")
    saved = path / DESCRIPTORS
    if saved.is_file():
        descriptors = np.load(saved)
    else:  # prepared before the audit existed
        root = Path(json.loads((path / "dataset.json").read_text())["root"])
        descriptors = np.stack([describe(read_rgb(root / r["image"])[0]) for r in rows])
    result = audit(descriptors, [r["fold"] for r in rows], [r["image"] for r in rows])
    return result, write_report(result, out or path, path.name)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="audit")
@report_errors
def main(cfg: DictConfig) -> None:
    prepared = prepare_dataset(OmegaConf.to_container(cfg.data, resolve=True), quiet=True)
    result, report = audit_prepared(prepared.path, Path(HydraConfig.get().runtime.output_dir))
    print(f"{summary_line(result)}\n  report: {report}")


if __name__ == "__main__":
    main()
