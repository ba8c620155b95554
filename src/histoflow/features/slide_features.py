"""A slide's features on disk: one `.npz` per slide in a cohort's `shards/` folder (a "slide feature shard", not a
WebDataset tar shard of patches: data/shards.py), written by the cohort's embedding and read by bags and maps
without Lightning (docs/cohorts.md).

    features   (tiles, dim) float32   the encoder's vector of each tissue tile
    coords_px  (tiles, 2) int64       level-0 x, y of each tile's top-left pixel
    coords_um  (tiles, 2) float       the same in microns
    meta       JSON                   slide, sha256, tiles, dim, mpp, geometry, settings, seconds, who embedded it
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from histoflow.common.files import atomic_path

FORMAT = 1  # meta["format"]
SHARDS = "shards"  # the folder of a cohort's slide feature files, named <slide sha256>.npz (the index's `shard`)


def slide_features_path(folder: Path, sha: str) -> Path:
    """Where the features of the slide whose bytes hash to `sha` lie in a cohort's folder."""
    return folder / SHARDS / f"{sha}.npz"


def write_slide_features(path: Path, features: np.ndarray, coords_px: np.ndarray, coords_um: np.ndarray,
                         meta: Mapping[str, Any]) -> None:
    """A slide's features, whole or not at all: written to a temporary name, fsynced, renamed, its folder fsynced."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, features=features, coords_px=coords_px, coords_um=coords_um,
                 meta=np.array(json.dumps(meta, sort_keys=True)))


def read_slide_features(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A slide's features: features, coords_px, coords_um (numpy arrays) and meta (a dict)."""
    with np.load(path) as npz:
        return {"features": npz["features"], "coords_px": npz["coords_px"], "coords_um": npz["coords_um"],
                "meta": json.loads(str(npz["meta"]))}


def slide_features_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta of a slide's features alone (the arrays are not read)."""
    with np.load(path) as npz:
        return json.loads(str(npz["meta"]))
