"""Packing patches into shards: a shard of patches is a pure function of its job (images, seed, patch settings),
the shuffled patches of a handful of images of one fold, and their pixel sums (the fold's training statistics
follow from these exactly). Written through shards.atomic_shard, so a rerun produces byte-identical files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from histoflow.common.errors import ConfigError
from histoflow.data.images import read_rgb
from histoflow.data.patches import PatchConfig, extract_patches
from histoflow.data.shards import add_sample, atomic_shard, sample_key


@dataclass(frozen=True)
class ShardJob:
    """What goes into one shard file."""

    name: str  # file name, e.g. "3-fit-00002.tar"
    fold: str
    part: str  # "fit" (training) or "val" (held out for validation)
    images: tuple[tuple[int, str, int], ...]  # (manifest index, absolute path, class index)
    seed: int


def empty_stats(side: int) -> dict[str, np.ndarray]:
    """Sums from which means and standard deviations of any union of shards follow exactly."""
    return {"pixel_sum": np.zeros((side, side, 3)), "channel_sumsq": np.zeros(3), "count": np.zeros((), np.int64)}


def add_stats(stats: dict[str, np.ndarray], patches: np.ndarray) -> None:
    stats["pixel_sum"] += patches.sum(axis=0, dtype=np.float64)
    # uint8 squares fit uint16, and 4096 of them fit uint32: exact, and ~50x faster than widening to int64
    for i in range(0, len(patches), 4096):
        squares = np.square(patches[i:i + 4096], dtype=np.uint16).sum(axis=0, dtype=np.uint32)
        stats["channel_sumsq"] += squares.reshape(-1, patches.shape[-1]).sum(axis=0)
    stats["count"] += len(patches)


def write_shard(job: ShardJob, patches_cfg: PatchConfig, out_dir: Path,
                stain: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Cut (after stain normalisation, when given), shuffle and write the job's patches; return the shard's record."""
    arrays, meta = [], []
    failed_before = getattr(stain, "failed", 0)
    for index, path, label in job.images:
        image, _ = read_rgb(path)
        if stain is not None:
            image = stain(image)
        p, xs, ys, rots = extract_patches(image, patches_cfg)
        arrays.append(p)
        meta.append(np.stack([np.full(len(p), index), xs, ys, rots, np.full(len(p), label)], axis=1))
    patches, meta = np.concatenate(arrays), np.concatenate(meta)
    sides = {a.shape[1:] for a in arrays}
    if len(sides) > 1:
        raise ConfigError(f"tiles of different sizes {sorted(sides)} in {job.name}. Fix: set data.patches.resize")
    order = np.random.default_rng(job.seed).permutation(len(patches))
    stats = empty_stats(patches.shape[1])
    add_stats(stats, patches)

    stats_tmp = out_dir / f".{job.name}.{os.getpid()}.stats.npz"
    try:
        with atomic_shard(out_dir / job.name) as tar:
            for i in order:
                index, x, y, rot, label = (int(v) for v in meta[i])
                add_sample(tar, sample_key(index, x, y, rot), label, patches[i])
            np.savez(stats_tmp, **stats)
            # the stats land first: a shard file that exists always has its sums beside it
            stats_tmp.replace(out_dir / f"{job.name}.stats.npz")
    finally:
        stats_tmp.unlink(missing_ok=True)
    return {"file": job.name, "fold": job.fold, "part": job.part, "samples": len(patches), "images": len(job.images),
            "stain_failed": getattr(stain, "failed", 0) - failed_before}
