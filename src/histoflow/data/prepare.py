"""Images on disk -> manifest with folds -> fold-aligned WebDataset shards + training means.

Runs once per source listing and settings: the output folder is named by a hash of the images' content, labels,
groups and every setting; one process at a time writes it (a file lock), a completion record is written last,
and an interrupted run resumes shard by shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from filelock import FileLock, Timeout

from histoflow.audit import DESCRIPTORS
from histoflow.config import read_section
from histoflow.data.fingerprint import content_hashes
from histoflow.data.folds import SplitConfig, check_leakage, write_manifest
from histoflow.data.manifest import build_manifest, one_class_error, warn_if_leaky
from histoflow.data.patches import PatchConfig
from histoflow.data.prepared import RECORD, PreparedDataset
from histoflow.data.problems import BadInputError, Problem, write_problems
from histoflow.data.shards import DiskFullError, ShardJob, empty_stats, write_shard
from histoflow.data.sources import ImageRecord, SourceConfig, class_names, list_images, resolve_root
from histoflow.data.stain import StainConfig, StainNormalizer
from histoflow.errors import ConfigError, HistoflowError
from histoflow.machine import cpu_count
from histoflow.progress import process_map, progress_bar

log = logging.getLogger(__name__)
_ANNOUNCED: set[Path] = set()  # prepared folders already logged by this process
FORMAT = 1  # bump when the shard layout changes, so old folders are not reused


def plan_shards(rows: list[dict], classes: list[str], root: Path, patches: PatchConfig,
                samples_per_shard: int, seed: int) -> list[ShardJob]:
    """Images of each (fold, part) in a seeded random order, cut into runs of about samples_per_shard patches."""
    jobs: list[ShardJob] = []
    keys = sorted({(r["fold"], "val" if r["val"] else "fit") for r in rows})
    for k, (fold, part) in enumerate(keys):
        members = [r for r in rows if r["fold"] == fold and ("val" if r["val"] else "fit") == part]
        order = np.random.default_rng([seed, k]).permutation(len(members))
        chunk: list[tuple[int, str, int]] = []
        count, n_shards = 0, 0
        for pos, i in enumerate(order):
            r = members[i]
            chunk.append((r["index"], str(root / r["image"]), classes.index(r["label"])))
            count += patches.count(r["height"], r["width"])
            if count >= samples_per_shard or pos == len(order) - 1:
                jobs.append(ShardJob(f"{fold}-{part}-{n_shards:05d}.tar", fold, part, tuple(chunk),
                                     seed * 1_000_003 + len(jobs)))
                chunk, count, n_shards = [], 0, n_shards + 1
    return jobs


def _key(name: str, records: list[ImageRecord], hashes: list[str], settings: Mapping[str, Any]) -> str:
    """Hash of the source listing (path, content, label, group) and every setting that changes the output."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r, sha in zip(records, hashes):
        h.update(f"{r.path}\0{sha}\0{r.label}\0{r.group}\n".encode())
    return f"{name}-{h.hexdigest()[:12]}"


@contextmanager
def _only_writer(out: Path) -> Iterator[None]:
    """Hold the prepared folder's lock: one process writes it, the others wait (the lock of a killed writer goes
    with its process)."""
    lock = FileLock(out / ".prepare.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that prepares %s (its lock: %s)", out, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class NotWritableError(HistoflowError, PermissionError):
    """The prepared data cannot be written where the configuration says."""


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NotWritableError(f"{out}: cannot write prepared data here ({e.strerror}). "
                              "Fix: set data.shards.dir (or paths.data_dir) to a writable folder") from e


def _run_jobs(jobs: list[ShardJob], patches: PatchConfig, shard_dir: Path, workers: int,
              stain: StainNormalizer | None = None) -> None:
    todo = [j for j in jobs if not (shard_dir / j.name).exists()]
    for leftover in shard_dir.glob(".*.tmp"):  # half-written by an interrupted run
        leftover.unlink()
    for leftover in shard_dir.glob(".*.stats.npz"):
        leftover.unlink()
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d shards already written", len(jobs) - len(todo), len(jobs))
    n_images = sum(len(j.images) for j in todo)
    with progress_bar() as bar:
        t_img = bar.add_task("images", total=n_images, rate="")
        t_shard = bar.add_task("shards", total=len(todo), rate="")
        t0, done_images, done_patches, unchanged = time.perf_counter(), 0, 0, 0
        for rec in process_map(_ShardWriter(patches, shard_dir, stain), todo, workers):
            unchanged += rec["stain_failed"]
            done_images, done_patches = done_images + rec["images"], done_patches + rec["samples"]
            dt = time.perf_counter() - t0
            bar.update(t_img, advance=rec["images"], rate=f"{done_images / dt:.0f} images/s")
            bar.update(t_shard, advance=1, rate=f"{done_patches / dt:.0f} patches/s")
    if unchanged:
        log.warning("stain normalisation left %d image(s) as they were (too little stain to estimate it from)",
                    unchanged)


class _ShardWriter:
    """Picklable callable for the worker processes."""

    def __init__(self, patches: PatchConfig, shard_dir: Path, stain: StainNormalizer | None = None):
        self.patches, self.shard_dir, self.stain = patches, shard_dir, stain

    def __call__(self, job: ShardJob) -> dict:
        return write_shard(job, self.patches, self.shard_dir, self.stain)


def _fold_stats(shard_dir: Path, jobs: list[ShardJob], test_folds: list[str], side: int) -> dict[str, dict]:
    """Training sums for each held-out fold, from the per-shard sums (no second pass over pixels)."""
    per_shard = {}
    for j in jobs:
        with np.load(shard_dir / f"{j.name}.stats.npz") as z:
            per_shard[j.name] = {k: z[k] for k in z.files}
    out = {}
    for t in test_folds:
        total = empty_stats(side)
        for j in jobs:
            if j.fold != t and j.part == "fit":
                for k in total:
                    total[k] = total[k] + per_shard[j.name][k]
        n = max(int(total["count"]), 1)
        pixels = n * side * side
        channel_mean = total["pixel_sum"].sum(axis=(0, 1)) / pixels
        channel_std = np.sqrt(np.maximum(total["channel_sumsq"] / pixels - channel_mean**2, 0))
        out[t] = {"mean_image": total["pixel_sum"] / n, "channel_mean": channel_mean, "channel_std": channel_std,
                  "count": total["count"]}
    return out


DATA_SECTIONS = ("_target_", "name", "on_bad_image", "cache_dir", "split", "stain", "patches", "shards", "loader")


@dataclass
class ShardsConfig:
    """The `data.shards` section: where the prepared folders go and how they are written."""

    dir: str | None = None  # None: data/prepared
    samples_per_shard: int = 4096
    workers: int | None = None  # processes that check images and write shards; None: one per CPU


def _announce(out: Path) -> PreparedDataset:
    if out not in _ANNOUNCED:  # the DataModule asks in prepare_data and again in setup
        log.info("prepared data found: %s", out)
        _ANNOUNCED.add(out)
    return PreparedDataset(out)


@dataclass
class _Plan:
    """A data config resolved, its source listed and its prepared folder named, before anything is written."""

    name: str
    source: SourceConfig
    split: SplitConfig
    patches: PatchConfig
    shards: ShardsConfig
    stain: StainNormalizer | None
    root: Path
    records: list[ImageRecord]
    problems: list[Problem]
    settings: dict[str, Any]
    hashes: list[str]
    out: Path

    @property
    def workers(self) -> int:
        return self.shards.workers or cpu_count()


def _plan(data: Mapping[str, Any]) -> _Plan:
    """Read the config, list the source and key the folder by the images' content and every setting."""
    source = read_section(SourceConfig, data, "data", ignore=DATA_SECTIONS)
    split = SplitConfig.from_config(data.get("split"))
    patches = PatchConfig.from_config(data.get("patches"))
    shards = read_section(ShardsConfig, data.get("shards"), "data.shards")
    on_bad = data.get("on_bad_image", "error")
    if on_bad not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_image={on_bad!r}: expected error or skip")
    name = data.get("name", "data")
    root = resolve_root(source, data.get("cache_dir") or "~/.cache/histoflow")
    records, problems = list_images(source, root)
    settings = {"format": FORMAT, "source": {k: v for k, v in asdict(source).items() if k not in ("root", "url", "mirrors")},
                "split": asdict(split), "patches": asdict(patches), "samples_per_shard": shards.samples_per_shard,
                "on_bad_image": on_bad}
    for section, key, off in (("split", "val_groups_per_class", 0), ("source", "groups", None)):
        if settings[section][key] == off:  # absent when off, so folders prepared before the option stay valid
            del settings[section][key]
    stain = StainNormalizer.from_config(StainConfig.from_config(data.get("stain")))
    if stain is not None:  # the fitted reference, not its path, keys the folder; absent when off (older folders stay)
        settings["stain"] = stain.state()
    parent = Path(shards.dir or "data/prepared").expanduser()
    hashes = content_hashes([root / r.path for r in records], parent / f".hashes-{name}.json")
    return _Plan(name, source, split, patches, shards, stain, root, records, problems, settings, hashes,
                 parent / _key(name, records, hashes, settings))


def prepare_dataset(data: Mapping[str, Any], quiet: bool = False) -> PreparedDataset:
    """Prepare (or find already prepared) shards for a data config; returns the prepared data set.

    One process at a time writes a folder: the others wait for its lock, then find the folder prepared.
    """
    plan = _plan(data)
    if (plan.out / RECORD).is_file():
        return _announce(plan.out)
    if plan.problems and plan.settings["on_bad_image"] == "error":
        raise BadInputError(plan.problems, str(plan.root))
    _writable(plan.out)
    with _only_writer(plan.out):
        if (plan.out / RECORD).is_file():  # another process prepared it while this one waited
            return _announce(plan.out)
        try:
            return _write(plan, quiet)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, DiskFullError):
                raise
            for leftover in plan.out.rglob(".*.tmp"):
                leftover.unlink()
            raise DiskFullError(f"{plan.out}: no space left on the device ({e}). Fix: free space there (the run "
                                "resumes where it stopped), or set data.shards.dir to a folder on a larger disk") from e


def _write(plan: _Plan, quiet: bool) -> PreparedDataset:
    """Check every image into the manifest, write the shards, sum each fold's statistics, write the record last
    (or finish what an interrupted run left); the caller holds the folder's lock."""
    out, root, split, patches, problems = plan.out, plan.root, plan.split, plan.patches, list(plan.problems)
    t0 = time.perf_counter()
    classes = class_names(plan.source, plan.records)
    manifest = out / "manifest.csv"
    if manifest.is_file():  # an interrupted run made it from the same listing and settings
        from histoflow.data.folds import read_manifest
        rows, notes = read_manifest(manifest), []
    else:
        rows, bad, notes, descriptors = build_manifest(plan.records, plan.hashes, root, split, patches, plan.workers)
        problems += bad
        if problems and plan.settings["on_bad_image"] == "error":
            raise BadInputError(problems, str(root))
        if not rows:
            raise BadInputError(problems or [Problem(str(root), "empty-class", "no images at all")], str(root))
        if (error := one_class_error(rows, classes, root)) is not None:
            raise error
        check_leakage(rows)
        write_problems(out / "problems.csv", skipped=problems, kept=notes)
        np.save(out / DESCRIPTORS, descriptors)
        write_manifest(rows, manifest)
        warn_if_leaky(descriptors, rows, out)
    if problems:
        log.warning("%d bad input(s) skipped, listed in %s", len(problems), out / "problems.csv")

    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    jobs = plan_shards(rows, classes, root, patches, plan.shards.samples_per_shard, split.seed)
    _run_jobs(jobs, patches, shard_dir, plan.workers, plan.stain)

    side = patches.side(rows[0]["height"], rows[0]["width"])
    stats_dir = out / "stats"
    stats_dir.mkdir(exist_ok=True)
    test_folds = split.test_folds(rows)
    for t, s in _fold_stats(shard_dir, jobs, test_folds, side).items():
        np.savez(stats_dir / f"fold-{t}.npz", **s)
    shard_records = []
    for j in jobs:
        with np.load(shard_dir / f"{j.name}.stats.npz") as z:
            shard_records.append({"file": j.name, "fold": j.fold, "part": j.part, "samples": int(z["count"]),
                                  "images": len(j.images)})
    record = {"format": FORMAT, "name": plan.name, "root": str(root), "classes": classes,
              "patch_side": side, "test_folds": test_folds, "settings": plan.settings, "images": len(rows),
              "samples": sum(s["samples"] for s in shard_records), "shards": shard_records,
              "skipped": len(problems), "seconds": round(time.perf_counter() - t0, 2)}
    tmp = out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / RECORD)
    if not quiet:
        print(f"prepared {record['images']} images into {record['samples']} patches in {len(jobs)} shards\n"
              f"  shards:   {shard_dir}\n  manifest: {manifest}\n  means:    {stats_dir}")
    return PreparedDataset(out)
