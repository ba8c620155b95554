"""What a fold of a bag head leaves beside its metrics: one prediction per held-out bag, each tile's attention.

    <run>/bag_predictions.csv  one row per held-out bag: image (or patient), group, fold, label, predicted, patches
                               (tiles), votes_<class> (the head's verdict on each tile taken alone, counted),
                               prob_<class> (the bag's probabilities): the rows of the k-fold report (image_report)
    <run>/bags.json            classes, bag level, head, the settings of the report, and the tiles' sources: each
                               source index's image or slide file (and a slide's feature shard, its tile geometry)
    <run>/attention.npz        per held-out bag: its tiles' coordinates (source index, x, y, rot) and attention
                               (ABMIL; the uniform 1/N of a mean for the pooling baselines)
    <run>/problems.csv         inputs left out of the bags (an image without a tile), with the reason
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from histoflow.data.problems import write_problems
from histoflow.features.bags import Bag, pad_bags

PREDICTIONS = "bag_predictions.csv"
RECORD = "bags.json"
ATTENTION = "attention.npz"


@torch.inference_mode()
def bag_outputs(model: torch.nn.Module, bags: Sequence[Bag], classes: Sequence[str],
                files: Mapping[str, str] | None = None,
                batch_size: int = 16) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Rows of held-out bags and each bag's attention over its tiles (N,), from an eval-mode head. `files`: the
    image file of each source index, named in the row of a bag of one image (the colour baseline reads it)."""
    model.eval()
    rows, attention = [], []
    for start in range(0, len(bags), batch_size):
        chunk = [(b, i) for i, b in enumerate(bags[start:start + batch_size])]
        x, mask, _, _ = pad_bags(chunk)
        probs = torch.softmax(model(x, mask), 1)
        weights = (model.attention_weights(x, mask) if hasattr(model, "attention_weights")
                   else mask.float() / mask.sum(1, keepdim=True))
        for k, (bag, _) in enumerate(chunk):
            votes = np.bincount(model.tile_logits(bag.features).argmax(1).numpy(), minlength=len(classes))
            one_image = files is not None and len(bag.images) == 1
            image = files[str(int(bag.coords[0, 0]))] if one_image else bag.name
            row: dict[str, Any] = {"image": image, "group": bag.group, "fold": bag.fold, "label": classes[bag.label],
                                   "predicted": classes[int(probs[k].argmax())], "patches": len(bag)}
            row.update({f"votes_{c}": int(v) for c, v in zip(classes, votes)})
            row.update({f"prob_{c}": round(float(p), 6) for c, p in zip(classes, probs[k])})
            rows.append(row)
            attention.append(weights[k, :len(bag)].numpy().astype(np.float32))
    return rows, attention


def write_predictions_and_attention(output_dir: Path, rows: Sequence[Mapping[str, Any]], bags: Sequence[Bag],
                                    attention: Sequence[np.ndarray]) -> Path:
    """A held-out fold's bag rows (bag_predictions.csv) and each bag's tile coordinates and attention
    (attention.npz), as every bag head writes them; the predictions' path."""
    path = output_dir / PREDICTIONS
    columns = list(rows[0]) if rows else ["image"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    np.savez_compressed(output_dir / ATTENTION, names=np.array([b.name for b in bags]),
                        **{f"coords_{i}": b.coords for i, b in enumerate(bags)},
                        **{f"attention_{i}": a for i, a in enumerate(attention)})
    return path


def write_bag_outputs(model: torch.nn.Module, datamodule: Any, output_dir: Path,
                      settings: Mapping[str, Any]) -> Path:
    """The held-out fold's bag predictions, attention, record and problems in output_dir; the predictions' path."""
    bags = datamodule.bags.get("test") or []
    classes = list(datamodule.classes)
    sources = datamodule.tile_sources(bags)
    rows, attention = bag_outputs(model, bags, classes, {k: v["path"] for k, v in sources.items()}
                                  if datamodule.level == "image" else None)
    path = write_predictions_and_attention(output_dir, rows, bags, attention)
    (output_dir / RECORD).write_text(json.dumps({"classes": classes, "level": datamodule.level,
                                                 "fold": str(datamodule.fold), "sources": sources, **dict(settings)},
                                                indent=1))
    write_problems(output_dir / "problems.csv", skipped=datamodule.problems)
    return path


def read_bag_predictions(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A fold run's bag rows (numbers typed) and record."""
    record = json.loads((run / RECORD).read_text())
    with (run / PREDICTIONS).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for r in rows:
        for k in list(r):
            if k.startswith("votes_") or k == "patches":
                r[k] = int(r[k])
            elif k.startswith("prob_"):
                r[k] = float(r[k])
    return rows, record
