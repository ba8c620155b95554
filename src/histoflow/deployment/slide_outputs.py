"""What a bag model's prediction leaves per new slide, in the formats the rest of histoflow reads:

    <out>/bags/                       bag_predictions.csv, bags.json, attention.npz: a fold run's form
                                      (training/bag_outputs.py), so inference/attention_maps.py draws the attention
                                      maps and the gallery of new slides as it draws the k-fold report's
    <out>/slides/<stem>.tiles.csv     x, y (level-0 tile origin), row, col, predicted, prob_<class>: each tile's own
                                      class probabilities (the head's verdict on the tile alone, fold models' mean)
    <out>/slides/<stem>.map.npy       float32 (rows, cols, classes) of those, NaN without a tile (deployment/slide_map's
                                      format: the viewer's probability overlay)
    <out>/slides/<stem>.json          geometry, classes, tiles, the slide's bag and its probabilities
    <out>/slides/<stem>.geojson       slide.export=[geojson]: the tiles as QuPath objects with prob_<class> and
                                      attention as measurements (deployment/geojson.py)
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from histoflow.common.files import atomic_path
from histoflow.deployment.bag_heads import FoldPredictions
from histoflow.deployment.geojson import tiles_feature_collection
from histoflow.features.bags import Bag
from histoflow.features.slide_features import slide_features_meta
from histoflow.inference.attention_maps import MAPS
from histoflow.inference.heatmap import output_names
from histoflow.slides.tiles import TileGeometry
from histoflow.training.bag_outputs import ATTENTION, PREDICTIONS, RECORD


def write_bag_folder(folder: Path, bags: Sequence[Bag], rows: Sequence[Mapping[str, Any]], pred: FoldPredictions,
                     found: Mapping[str, Mapping[str, Any]], classes: Sequence[str], level: str,
                     task: Mapping[str, Any] | None = None) -> Path:
    """The new bags as a fold run leaves its held-out bags (training/bag_outputs.py; a survival or regression head's:
    training/target_outputs.py, its task in the record); the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / PREDICTIONS).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    np.savez_compressed(folder / ATTENTION, names=np.array([b.name for b in bags]),
                        **{f"coords_{i}": b.coords for i, b in enumerate(bags)},
                        **{f"attention_{i}": a for i, a in enumerate(pred.attention)})
    sources = {str(r["number"]): {"path": slide, "shard": r["shard"]} for slide, r in found.items()}
    (folder / RECORD).write_text(json.dumps({"classes": list(classes), "level": level, "fold": "external",
                                             "sources": sources, **({"task": dict(task)} if task else {})}, indent=1))
    return folder


def write_slide_outputs(out: Path, bags: Sequence[Bag], pred: FoldPredictions,
                        found: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                        classes: Sequence[str], geojson: bool, names: Mapping[Path, str] | None = None) -> list[Path]:
    """Each slide's tile probabilities (CSV, map, JSON) in out/slides/<name>.* and, geojson: its QuPath objects with
    the attention map's measurements beside; the JSON paths. `names`: each slide's outputs' name (slides.csv's
    `output`, the attention maps' names); by default inference.heatmap.output_names in `found`'s order."""
    folder = out / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    names = names if names is not None else output_names([Path(s) for s in found])
    written = []
    for i, bag in enumerate(bags):
        for slide in bag.images:
            info = found[slide]
            mine = bag.coords[:, 0] == int(info["number"])
            stem = folder / names[Path(slide)]  # a name may hold dots (TCGA's): suffixes added, never replaced
            meta = slide_features_meta(Path(info["shard"]))
            written.append(_write_slide(stem, slide, meta, bag.coords[mine, 1:3], pred.tile_probs[i][mine],
                                        rows[i], classes))
            if geojson:
                geometry = meta["geometry"]
                maps = [(_named(stem, ".tiles.csv"), geometry)]
                attention = out / MAPS / f"{names[Path(slide)]}.tiles.csv"
                if attention.is_file():
                    maps.append((attention, geometry))
                with atomic_path(_named(stem, ".geojson")) as tmp:
                    Path(tmp).write_text(json.dumps(tiles_feature_collection(maps)))
    return written


def _named(stem: Path, suffix: str) -> Path:
    """stem's file with `suffix` added (Path.with_suffix would cut a name at its last dot: a.b -> a.map.npy)."""
    return stem.with_name(stem.name + suffix)


def _write_slide(stem: Path, slide: str, meta: Mapping[str, Any], origins: np.ndarray, probs: np.ndarray,
                 row: Mapping[str, Any], classes: Sequence[str]) -> Path:
    g = TileGeometry(**meta["geometry"])
    r, c = g.grid_index(np.asarray(origins, dtype=np.int64))
    grid = np.full((g.rows, g.cols, len(classes)), np.nan, dtype=np.float32)
    grid[r, c] = probs
    np.save(_named(stem, ".map.npy"), grid)
    with _named(stem, ".tiles.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "row", "col", "predicted", *(f"prob_{k}" for k in classes)])
        writer.writerows([int(x), int(y), int(a), int(b), classes[int(p.argmax())], *(f"{v:.6f}" for v in p)]
                         for (x, y), a, b, p in zip(origins, r, c, probs))
    path = _named(stem, ".json")
    path.write_text(json.dumps({
        "slide": slide, "bag": row["image"], "classes": list(classes), "tiles": len(origins),
        "geometry": asdict(g), "level0_size": list(meta.get("dimensions") or []),
        "files": {"map": f"{stem.name}.map.npy", "csv": f"{stem.name}.tiles.csv"},
        "mean_probability": {k: float(row[f"prob_{k}"]) for k in classes},
        "scale": "each tile's own class probabilities (the head on the tile alone), the fold models' mean; "
                 "mean_probability: the slide's bag"}, indent=1))
    return path
