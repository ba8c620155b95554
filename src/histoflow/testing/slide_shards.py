"""A slide's tiles as WebDataset shards in prepare's sample format, for training on slides as on prepared images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from histoflow.data.packing import add_stats, empty_stats
from histoflow.data.shards import add_sample, atomic_shard, sample_key
from histoflow.slides.backend import DEFAULT_BACKEND
from histoflow.slides.slide import DamagedTileError
from histoflow.slides.tiles import SlideTiles, TileGeometry, stored_tiles, tile_loader


def write_slide_shards(slide_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], labels: int | Sequence[int],
                       geometry: TileGeometry, origins: np.ndarray, slide_index: int = 0, samples_per_shard: int = 1024,
                       seed: int = 0, name: str | None = None, num_workers: int = 0,
                       backend: str = DEFAULT_BACKEND) -> list[dict]:
    """Write the tiles at `origins` as WebDataset shards in prepare's sample format; return the shard records.

    Samples are `<slide_index>-<x>-<y>-000` (level-0 tile origin) with `.npy` (uint8 tile) and `.cls` (class index:
    `labels` for the whole slide or one per tile, e.g. from annotations). Tiles are written in a seeded random order,
    so every shard samples the whole slide, and each shard gets prepare's `.stats.npz` pixel sums beside it.
    One shard's tiles are held in memory at a time (per loader worker). A stored slide tile that does not decode
    raises DamagedTileError: a shard holds what the slide holds.
    """
    out, stem = Path(out_dir), name or Path(slide_path).stem
    out.mkdir(parents=True, exist_ok=True)
    origins = np.asarray(origins, np.int64)
    per_tile = np.broadcast_to(np.asarray(labels, np.int64), (len(origins),))
    order = np.random.default_rng(seed).permutation(len(origins))
    # one loader item is one shard's tiles, so the shard's sums and its members come from the same batch
    tiles = SlideTiles(slide_path, origins[order], geometry, samples_per_shard, backend=backend)
    records = []
    for index, batch, damaged in tile_loader(tiles, num_workers):
        if damaged:
            raise DamagedTileError(slide_path, stored_tiles(damaged))
        shard_name = f"{stem}-{index:05d}.tar"
        picked = order[index * samples_per_shard:(index + 1) * samples_per_shard]
        stats = empty_stats(geometry.tile_size)
        add_stats(stats, batch)
        with atomic_shard(out / shard_name) as tar:
            for tile, i in zip(batch, picked):
                x, y = (int(v) for v in origins[i])
                add_sample(tar, sample_key(slide_index, x, y, 0), int(per_tile[i]), tile)
            np.savez(out / f"{shard_name}.stats.npz", **stats)  # sums first: a shard that exists has them beside it
        records.append({"file": shard_name, "samples": len(batch), "slide": str(slide_path)})
    return sorted(records, key=lambda r: r["file"])
