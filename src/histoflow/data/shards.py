"""One WebDataset shard: the shuffled patches of a handful of images of one fold, and their pixel sums.

A shard is a pure function of its job (images, seed, patch settings), written under a temporary name
and renamed when complete, so an interrupted run redoes only the shards it had not finished and
produces byte-identical files. Patches are stored as .npy (lossless; decoding is a header parse and a
buffer view, ten times faster than PNG, see benchmarks/bench_prepare.py).
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from histoflow.data.images import read_rgb
from histoflow.data.patches import PatchConfig, extract_patches


@dataclass(frozen=True)
class ShardJob:
    """What goes into one shard file."""

    name: str  # file name, e.g. "3-fit-00002.tar"
    fold: str
    part: str  # "fit" (training) or "val" (held out for validation)
    images: tuple[tuple[int, str, int], ...]  # (manifest index, absolute path, class index)
    seed: int


def sample_key(image: int, x: int, y: int, rot: int) -> str:
    """The sample's key carries its provenance; dot-free, as WebDataset splits keys at the first dot."""
    return f"{image:06d}-{x:05d}-{y:05d}-{rot:03d}"


def parse_key(key: str) -> dict[str, int]:
    """Manifest index of the image, patch origin (x, y) and rotation of a sample, from its key."""
    image, x, y, rot = (int(v) for v in key.rsplit("/", 1)[-1].split("-"))
    return {"image": image, "x": x, "y": y, "rot": rot}


def encode_npy(patch: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, patch, allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    buf = io.BytesIO(head)
    major, _ = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read_header(buf)


def decode_npy(data: bytes) -> np.ndarray:
    """Read an .npy payload as a read-only view; the header of a run of equal patches is parsed once."""
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    shape, fortran, dtype = _npy_header(bytes(data[:end]))
    arr = np.frombuffer(data, dtype=dtype, offset=end, count=int(np.prod(shape)))
    return arr.reshape(shape, order="F" if fortran else "C")


def empty_stats(side: int) -> dict[str, np.ndarray]:
    """Sums from which means and standard deviations of any union of shards follow exactly."""
    return {"pixel_sum": np.zeros((side, side, 3)), "channel_sumsq": np.zeros(3), "count": np.zeros((), np.int64)}


def add_stats(stats: dict[str, np.ndarray], patches: np.ndarray) -> None:
    stats["pixel_sum"] += patches.sum(axis=0, dtype=np.float64)
    flat = patches.reshape(-1, 3).astype(np.int64)
    stats["channel_sumsq"] += np.einsum("ij,ij->j", flat, flat)
    stats["count"] += len(patches)


def write_shard(job: ShardJob, patches_cfg: PatchConfig, out_dir: Path) -> dict:
    """Cut, shuffle and write the job's patches; return the shard's record."""
    arrays, meta = [], []
    for index, path, label in job.images:
        image, _ = read_rgb(path)
        p, xs, ys, rots = extract_patches(image, patches_cfg)
        arrays.append(p)
        meta.append(np.stack([np.full(len(p), index), xs, ys, rots, np.full(len(p), label)], axis=1))
    patches, meta = np.concatenate(arrays), np.concatenate(meta)
    sides = {a.shape[1:] for a in arrays}
    if len(sides) > 1:
        raise ValueError(f"tiles of different sizes {sorted(sides)} in {job.name}. Fix: set data.patches.resize")
    order = np.random.default_rng(job.seed).permutation(len(patches))
    stats = empty_stats(patches.shape[1])
    add_stats(stats, patches)

    tmp = out_dir / f".{job.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="histoflow", group="histoflow") as tar:
        for i in order:
            # two members per sample: each tar member costs more to write than the patch itself
            index, x, y, rot, label = (int(v) for v in meta[i])
            tar.write({"__key__": sample_key(index, x, y, rot), "npy": encode_npy(patches[i]), "cls": b"%d" % label})
    stats_tmp = out_dir / f".{job.name}.{os.getpid()}.stats.npz"
    np.savez(stats_tmp, **stats)
    # the stats land first: a shard file that exists always has its sums beside it
    stats_tmp.replace(out_dir / f"{job.name}.stats.npz")
    tmp.replace(out_dir / job.name)
    return {"file": job.name, "fold": job.fold, "part": job.part, "samples": len(patches), "images": len(job.images)}
