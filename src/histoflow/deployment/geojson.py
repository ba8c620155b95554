"""A slide's tiles as a GeoJSON FeatureCollection that QuPath imports (File > Import objects): one square per tile
in level-0 pixels, its predicted class as the classification, its class probabilities and attention as measurements.

QuPath reads `properties.objectType` ("tile", "detection" or "annotation"), `properties.classification.name` and
`properties.measurements` (a name -> number dict). Written from the tiles CSVs a run left (deployment/slide_map.py's
probabilities, inference/attention_maps.py's attention): nothing is recomputed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from histoflow.common.files import atomic_path


def _tile_side(geometry: Mapping[str, Any]) -> int:
    """A tile's side in level-0 pixels."""
    return round(geometry["read_size"] * geometry["downsample"])


def _read(tiles_csv: Path) -> list[dict[str, str]]:
    with Path(tiles_csv).open(newline="") as handle:
        return list(csv.DictReader(handle))


def tiles_feature_collection(maps: Sequence[tuple[Path, Mapping[str, Any]]]) -> dict[str, Any]:
    """The FeatureCollection of a slide's tiles from its maps, each (tiles CSV, geometry): a tile in several maps
    (a prediction's and an attention map of the same grid) is one feature with all their measurements."""
    features: dict[tuple[int, int, int], dict[str, Any]] = {}
    for tiles_csv, geometry in maps:
        side = _tile_side(geometry)
        for row in _read(tiles_csv):
            x, y = int(row["x"]), int(row["y"])
            feature = features.setdefault((x, y, side), {
                "type": "Feature",
                "geometry": {"type": "Polygon",
                             "coordinates": [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]},
                "properties": {"objectType": "tile", "measurements": {}},
            })
            props = feature["properties"]
            if row.get("predicted"):
                props["classification"] = {"name": row["predicted"]}
            for key, value in row.items():
                if key.startswith("prob_") or key in ("attention", "relative"):
                    name = f"attention ({key})" if key == "relative" else key
                    props["measurements"][name] = float(value)
    return {"type": "FeatureCollection", "features": list(features.values())}


def write_tiles_geojson(tiles_csv: Path, meta: Mapping[str, Any], out: Path) -> Path:
    """<stem>.geojson beside a slide map: predict writes it with slide.export=[geojson]."""
    collection = tiles_feature_collection([(Path(tiles_csv), meta["geometry"])])
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(collection))
    return out
