"""A slide's features on disk: one `.npz` per slide in a cohort's `shards/` folder (a "slide feature shard", not a
WebDataset tar shard of patches: data/shards.py), written by the cohort's embedding and read by bags and maps
without Lightning (docs/cohorts.md).

    features   (tiles, dim) float32   the encoder's vector of each tissue tile
    coords_px  (tiles, 2) int64       level-0 x, y of each tile's top-left pixel
    coords_um  (tiles, 2) float       the same in microns
    meta       JSON                   slide, sha256, tiles, dim, mpp, geometry, settings, seconds, who embedded it
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from histoflow.common.errors import DamagedFileError
from histoflow.common.files import atomic_path
from histoflow.data.shards import DiskFullError

FORMAT = 1  # meta["format"]
DAMAGED = (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError)  # what numpy raises on a cut-short .npz
SHARDS = "shards"  # the folder of a cohort's slide feature files, named <slide sha256>.npz (the index's `shard`)


class DamagedSlideFeaturesError(DamagedFileError):
    """A slide feature file that does not read (truncated, overwritten): the message names it and the fix."""


def slide_features_path(folder: Path, sha: str, mpp: float | None = None) -> Path:
    """Where the features of the slide whose bytes hash to `sha` lie in a cohort's folder; `mpp`: the microns per
    pixel a slide table gives it (its `mpp` column), which tiles it otherwise than its file's do: another file."""
    return folder / SHARDS / (f"{sha}.npz" if mpp is None else f"{sha}.mpp-{mpp:g}.npz")


def write_slide_features(path: Path, features: np.ndarray, coords_px: np.ndarray, coords_um: np.ndarray,
                         meta: Mapping[str, Any]) -> None:
    """A slide's features, whole or not at all: written to a temporary name, fsynced, renamed, its folder fsynced.
    A full disk is a DiskFullError naming the folder (nothing half-written is left)."""
    try:
        with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, features=features, coords_px=coords_px, coords_um=coords_um,
                     meta=np.array(json.dumps(meta, sort_keys=True)))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, DiskFullError):
            raise
        raise DiskFullError(f"{Path(path).parent}: no space left on the device while writing {Path(path).name}. "
                            "Fix: free space there (the rerun reuses the slides embedded so far), or set embed.out "
                            "(data.features.out with data=slides) to a folder on a larger disk") from None


def _damaged(path: str | os.PathLike[str], error: BaseException) -> DamagedSlideFeaturesError:
    return DamagedSlideFeaturesError(
        f"{path}: a damaged slide feature file ({type(error).__name__}: {error}). Fix: run the embedding again "
        "(`histoflow embed slides=<the table>` with the same settings, or train again with data=slides): it embeds "
        "this slide again")


def read_slide_features(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A slide's features: features, coords_px, coords_um (numpy arrays) and meta (a dict); a file that does not
    read is a DamagedSlideFeaturesError naming it and the fix."""
    try:
        with np.load(path) as npz:
            return {"features": npz["features"], "coords_px": npz["coords_px"], "coords_um": npz["coords_um"],
                    "meta": json.loads(str(npz["meta"]))}
    except DAMAGED as e:
        if isinstance(e, OSError) and not Path(path).is_file():
            raise
        raise _damaged(path, e) from None


def slide_features_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta of a slide's features alone (the arrays are not read); DamagedSlideFeaturesError as above."""
    try:
        with np.load(path) as npz:
            return json.loads(str(npz["meta"]))
    except DAMAGED as e:
        if isinstance(e, OSError) and not Path(path).is_file():
            raise
        raise _damaged(path, e) from None

