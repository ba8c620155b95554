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
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from histoflow.common.config import read_section
from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.common.machine import cpu_count
from histoflow.common.progress import process_map, progress_bar
from histoflow.data.audit import DESCRIPTORS
from histoflow.data.dataset import RECORD, PreparedDataset
from histoflow.data.fingerprint import content_hashes
from histoflow.data.folds import SplitConfig, check_leakage
from histoflow.data.locks import only_writer, writable
from histoflow.data.manifest import (
    build_manifest,
    one_class_error,
    read_manifest,
    warn_if_leaky,
    write_manifest,
)
from histoflow.data.packing import ShardJob, empty_stats, write_shard
from histoflow.data.patches import PatchConfig
from histoflow.data.problems import BadInputError, Problem, write_problems
from histoflow.data.shards import DiskFullError
from histoflow.data.sources import (
    ImageRecord,
    SourceConfig,
    class_names,
    list_images,
    resolve_root,
)
from histoflow.data.stain import StainConfig, StainNormalizer

log = logging.getLogger(__name__)
_ANNOUNCED: set[Path] = set()  # prepared folders already logged by this process
FORMAT = 1  # bump when the shard layout changes, so old folders are not reused
MANIFEST = "manifest.csv"


@dataclass
class ShardsConfig:
    """The `data.shards` section: where the prepared folders go and how they are written."""

    dir: str | None = None  # None: data/prepared
    samples_per_shard: int = 4096
    workers: int | None = None  # processes that check images and write shards; None: one per CPU

    @property
    def parent(self) -> Path:
        return Path(self.dir or "data/prepared").expanduser()

    @property
    def processes(self) -> int:
        return self.workers or cpu_count()


@dataclass
class DataConfig(SourceConfig):
    """The `data` config as prepare reads it, in one read: the source's keys at its top (SourceConfig), beside
    these, and a section per step; `loader` is the DataModule's (LoaderConfig), `_target_` and `bag_target` (the
    DataModule under a head on bags) train's."""

    name: str = "data"  # the prepared folder is <name>-<hash>
    on_bad_image: str = "error"  # error: list every bad file and stop | skip: leave them out, listed in problems.csv
    cache_dir: str | None = None  # downloads go here; None: ~/.cache/histoflow
    split: SplitConfig = field(default_factory=SplitConfig)
    stain: StainConfig = field(default_factory=StainConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> DataConfig:
        return read_section(cls, data, "data", ignore=("_target_", "bag_target", "loader"))

    def __post_init__(self) -> None:
        if self.on_bad_image not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_image={self.on_bad_image!r}: expected error or skip")

    @property
    def downloads(self) -> str:
        return self.cache_dir or "~/.cache/histoflow"


def prepare_dataset(data: DataConfig | Mapping[str, Any], quiet: bool = False) -> PreparedDataset:
    """Prepare (or find already prepared) shards for a data config; returns the prepared data set.

    Steps: resolve (list the source, name the folder); where that folder is not prepared yet, manifest, shards,
    statistics and record, each resuming what an interrupted run left. One process at a time writes a folder:
    the others wait for its lock, then find the folder prepared.
    """
    plan = _resolve(data if isinstance(data, DataConfig) else DataConfig.from_config(data))
    if (plan.out / RECORD).is_file() and not _damaged_shards(plan.out):
        return _announce(plan.out)
    plan.refuse_bad_inputs(plan.problems)
    new = not plan.out.exists()
    writable(plan.out, "prepared data", "set data.shards.dir (or paths.data_dir) to a writable folder")
    lock = only_writer(plan.out / ".prepare.lock", f"prepares {plan.out}")
    with lock, _explain_disk_full(plan.out), _removed_if_refused(plan.out, new):
        if (plan.out / RECORD).is_file():  # another process prepared it while this one waited, or a shard is gone
            damaged = _damaged_shards(plan.out)
            if not damaged:
                return _announce(plan.out)
            log.warning("%s: %d shard(s) missing or not whole (%s%s): writing them again", plan.out, len(damaged),
                        ", ".join(damaged[:5]), ", ..." if len(damaged) > 5 else "")
            for name in damaged:
                (plan.out / "shards" / name).unlink(missing_ok=True)
            (plan.out / RECORD).unlink()
        started = time.perf_counter()
        rows, problems = _manifest(plan)
        jobs = _shards(plan, rows)
        side, test_folds = _statistics(plan, rows, jobs)
        record = _record(plan, rows, jobs, side, test_folds, len(problems), time.perf_counter() - started)
    if not quiet:
        print(f"prepared {record['images']} images into {record['samples']} patches in {len(jobs)} shards\n"
              f"  shards:   {plan.out / 'shards'}\n  manifest: {plan.out / MANIFEST}\n  means:    {plan.out / 'stats'}")
    return PreparedDataset(plan.out)


@dataclass
class _Plan:
    """A data config resolved: its source listed and its prepared folder named, before anything is written."""

    cfg: DataConfig
    stain: StainNormalizer | None
    root: Path
    records: list[ImageRecord]
    problems: list[Problem]
    classes: list[str]
    settings: dict[str, Any]
    hashes: list[str]
    out: Path

    def refuse_bad_inputs(self, problems: list[Problem]) -> None:
        if problems and self.cfg.on_bad_image == "error":
            raise BadInputError(problems, str(self.root))


def _resolve(cfg: DataConfig) -> _Plan:
    """List the source and key its folder by the images' content and every setting."""
    root = resolve_root(cfg, cfg.downloads)
    records, problems = list_images(cfg, root)
    stain = StainNormalizer.from_config(cfg.stain)
    settings = _settings(cfg, stain)
    parent = cfg.shards.parent
    hashes = content_hashes([root / r.path for r in records], parent / f".hashes-{cfg.name}.json")
    return _Plan(cfg, stain, root, records, problems, class_names(cfg, records), settings, hashes,
                 parent / _key(cfg.name, records, hashes, settings))


def _settings(cfg: DataConfig, stain: StainNormalizer | None) -> dict[str, Any]:
    """Every setting that changes the prepared data, as the folder's key has always hashed them."""
    source = {f.name: getattr(cfg, f.name) for f in fields(SourceConfig)
              if f.name not in ("root", "url", "mirrors", "patient_labels")}  # patient_labels checks, changes nothing
    settings = {"format": FORMAT, "source": source, "split": asdict(cfg.split), "patches": asdict(cfg.patches),
                "samples_per_shard": cfg.shards.samples_per_shard, "on_bad_image": cfg.on_bad_image}
    for section, key, off in (("split", "val_groups_per_class", 0), ("source", "groups", None)):
        if settings[section][key] == off:  # absent when off, so folders prepared before the option stay valid
            del settings[section][key]
    if stain is not None:  # the fitted reference, not its path, keys the folder; absent when off (older folders stay)
        settings["stain"] = stain.state()
    return settings


def _key(name: str, records: list[ImageRecord], hashes: list[str], settings: Mapping[str, Any]) -> str:
    """Hash of the source listing (path, content, label, group) and every setting that changes the output."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r, sha in zip(records, hashes):
        h.update(f"{r.path}\0{sha}\0{r.label}\0{r.group}\n".encode())
    return f"{name}-{h.hexdigest()[:12]}"


def _manifest(plan: _Plan) -> tuple[list[dict], list[Problem]]:
    """Every image checked into the manifest with its fold (the bad ones into problems.csv, the audit's descriptors
    beside it); the rows and the bad inputs left out."""
    path, problems = plan.out / MANIFEST, list(plan.problems)
    if path.is_file():  # an interrupted run made it from the same listing and settings
        rows = read_manifest(path)
    else:
        cfg = plan.cfg
        rows, bad, notes, descriptors = build_manifest(plan.records, plan.hashes, plan.root, cfg.split, cfg.patches,
                                                       cfg.shards.processes)
        problems += bad
        plan.refuse_bad_inputs(problems)
        if not rows:
            raise BadInputError(problems or [Problem(str(plan.root), "empty-class", "no images at all")],
                                str(plan.root))
        if (error := one_class_error(rows, plan.classes, plan.root)) is not None:
            raise error
        check_leakage(rows)
        write_problems(plan.out / "problems.csv", skipped=problems, kept=notes)
        np.save(plan.out / DESCRIPTORS, descriptors)
        write_manifest(rows, path)
        warn_if_leaky(descriptors, rows, plan.out)
    if problems:
        log.warning("%d bad input(s) skipped, listed in %s", len(problems), plan.out / "problems.csv")
    return rows, problems


def _shards(plan: _Plan, rows: list[dict]) -> list[ShardJob]:
    """The shards of every (fold, part), those not written yet written now."""
    shard_dir = plan.out / "shards"
    shard_dir.mkdir(exist_ok=True)
    cfg = plan.cfg
    jobs = plan_shards(rows, plan.classes, plan.root, cfg.patches, cfg.shards.samples_per_shard, cfg.split.seed)
    _run_jobs(jobs, cfg.patches, shard_dir, cfg.shards.processes, plan.stain)
    return jobs


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


def _statistics(plan: _Plan, rows: list[dict], jobs: list[ShardJob]) -> tuple[int, list[str]]:
    """Each held-out fold's training statistics in stats/fold-<fold>.npz; the patch side and the held-out folds."""
    side = plan.cfg.patches.side(rows[0]["height"], rows[0]["width"])
    stats_dir = plan.out / "stats"
    stats_dir.mkdir(exist_ok=True)
    test_folds = plan.cfg.split.test_folds(rows)
    for t, s in _fold_stats(plan.out / "shards", jobs, test_folds, side).items():
        np.savez(stats_dir / f"fold-{t}.npz", **s)
    return side, test_folds


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


def _record(plan: _Plan, rows: list[dict], jobs: list[ShardJob], side: int, test_folds: list[str], skipped: int,
            seconds: float) -> dict[str, Any]:
    """The completion record, written last (atomically): what a later run finds the folder prepared by."""
    shard_records = []
    for j in jobs:
        with np.load(plan.out / "shards" / f"{j.name}.stats.npz") as z:
            shard_records.append({"file": j.name, "fold": j.fold, "part": j.part, "samples": int(z["count"]),
                                  "images": len(j.images), "bytes": (plan.out / "shards" / j.name).stat().st_size})
    record = {"format": FORMAT, "name": plan.cfg.name, "root": str(plan.root), "classes": plan.classes,
              "patch_side": side, "test_folds": test_folds, "settings": plan.settings, "images": len(rows),
              "samples": sum(s["samples"] for s in shard_records), "shards": shard_records,
              "skipped": skipped, "seconds": round(seconds, 2)}
    tmp = plan.out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(plan.out / RECORD)
    return record


def _damaged_shards(out: Path) -> list[str]:
    """The shards the completion record lists that are missing or not of their recorded size (records written
    before sizes were kept: missing only)."""
    record = json.loads((out / RECORD).read_text())
    damaged = []
    for shard in record["shards"]:
        path = out / "shards" / shard["file"]
        if not path.is_file() or path.stat().st_size != shard.get("bytes", path.stat().st_size):
            damaged.append(shard["file"])
    return damaged


def _announce(out: Path) -> PreparedDataset:
    if out not in _ANNOUNCED:  # the DataModule asks in prepare_data and again in setup
        log.info("prepared data found: %s", out)
        _ANNOUNCED.add(out)
    return PreparedDataset(out)


@contextmanager
def _removed_if_refused(out: Path, new: bool) -> Iterator[None]:
    """A folder this run made goes again when the data are refused before any shard is finished (a window larger
    than the images, more folds than patients): no empty or half-written folder is left behind. An interruption or
    a crash keeps it, so that the next run resumes."""
    try:
        yield
    except HistoflowError:
        if new and not any((out / "shards").glob("*.tar")):
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextmanager
def _explain_disk_full(out: Path) -> Iterator[None]:
    """A full disk (or quota) as a DiskFullError that names the fix, the half-written files removed."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, DiskFullError):
            raise
        for leftover in out.rglob(".*.tmp"):
            leftover.unlink()
        raise DiskFullError(f"{out}: no space left on the device ({e}). Fix: free space there (the run resumes "
                            "where it stopped), or set data.shards.dir to a folder on a larger disk") from e
