"""What a fold of a survival or regression bag head leaves: one row per held-out bag, each tile's attention.

The same files as a classifier's (training/bag_outputs.py), so that a multirun's report finds them alike:

    <run>/bag_predictions.csv  image (the bag: image, slide or patient), group (patient), fold, patches (tiles), and
                               survival: time, event, risk (higher: the event sooner); regression: target, predicted
    <run>/bags.json            the task (name, columns, loss), bag level, head, settings, the tiles' sources
    <run>/attention.npz        per held-out bag: its tiles' coordinates and attention (ABMIL; 1/N for pooling)
    <run>/problems.csv         inputs left out of the bags (no tile, no target), with the reason
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from histoflow.data.problems import write_problems
from histoflow.features.bags import Bag, pad_bags
from histoflow.training.bag_outputs import RECORD, write_predictions_and_attention
from histoflow.training.task_module import BagTargetModule


@torch.inference_mode()
def target_rows(module: BagTargetModule, bags: Sequence[Bag],
                batch_size: int = 16) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Rows of held-out bags (their targets and predicted risk or value) and each bag's attention over its tiles."""
    model = module.model.eval()
    survival = module.task.name == "survival"
    rows, attention = [], []
    for start in range(0, len(bags), batch_size):
        chunk = [(b, i) for i, b in enumerate(bags[start:start + batch_size])]
        x, mask, _, _ = pad_bags(chunk)
        values = module.predict_value(model(x, mask))
        weights = (model.attention_weights(x, mask) if hasattr(model, "attention_weights")
                   else mask.float() / mask.sum(1, keepdim=True))
        for k, (bag, _) in enumerate(chunk):
            row: dict[str, Any] = {"image": bag.name, "group": bag.group, "fold": bag.fold, "patches": len(bag)}
            if survival:
                row.update(time=float(bag.target[0]), event=int(bag.target[1]), risk=round(float(values[k]), 6))
            else:
                row.update(target=float(bag.target[0]), predicted=round(float(values[k]), 6))
            rows.append(row)
            attention.append(weights[k, :len(bag)].numpy().astype(np.float32))
    return rows, attention


def write_target_outputs(module: BagTargetModule, datamodule: Any, output_dir: Path,
                         settings: Mapping[str, Any]) -> Path:
    """The held-out fold's rows, attention, record and problems in output_dir; the predictions' path."""
    bags = datamodule.bags.get("test") or []
    rows, attention = target_rows(module, bags)
    path = write_predictions_and_attention(output_dir, rows, bags, attention)
    task = module.task
    record = {"task": {"name": task.name, "loss": task.loss, "columns": list(task.columns), "key": task.key},
              "classes": list(datamodule.classes), "level": datamodule.level, "fold": str(datamodule.fold),
              "stratified_by": getattr(datamodule, "stratified_by", None), "sources": datamodule.tile_sources(bags),
              **dict(settings)}
    (output_dir / RECORD).write_text(json.dumps(record, indent=1))
    write_problems(output_dir / "problems.csv", skipped=datamodule.problems)
    return path
