"""A cohort of whole slides through a frozen encoder, once: every tissue tile of every slide of a slide table, into one
feature shard per slide and a cohort index (`histoflow embed slides=<table.csv> encoder=...`, docs/cohorts.md).

    <embed.out>/<encoder>-<settings key>/   one folder per encoder (name, config, weights' sha256) and tiling
        settings.json                       (slide.mpp, tile_size, stride, tissue mask): what the key hashes
        shards/<slide sha256>.npz           features (tiles, dim) float32, coords_px (tiles, 2) level-0 x, y of each
                                            tile's top-left pixel, coords_um the same in microns, meta (JSON)
        <name>.index.csv                    slide, patient, label, tiles, shard, seconds, sha256 + the table's columns
        <name>.problems.csv                 the slides left out (unreadable, no tissue, no MPP) and why
        parts/<name>/                       each chunk's rows, merged into the index once every chunk has written

A shard is named by the sha256 of the slide file's bytes (every byte: a re-scan or re-export is another slide; a
copy or a move is the same one), in a folder named by the settings, so an unchanged slide is embedded once
whatever its path, and a changed one again. The hash of a file whose status (size, times, inode) has not changed
is remembered (data.fingerprint), so a rerun reads no slide twice; a moved slide is read once more, to hash it.

Each shard is written to a temporary name, fsynced and renamed, under a lock of its own (data.locks.only_writer):
a killed run leaves whole shards only, and two jobs on one folder never embed a slide twice (the second waits for
the first, then finds the shard). Slides are shared out by `embed.chunk=i/n` (jobs, e.g. a Hydra submitit sweep)
and then over the devices of a job (Lightning Fabric ranks), both by `balanced_bins` of the files' sizes, a
deterministic rule every process computes alike: no slide is embedded by two ranks, and no collective runs inside
the per-slide loop (one barrier at the end), so ranks with unequal slides never hang.

Within a process, a thread plans the next slide (hash, tissue mask, tile grid) while this one is embedded, and the
next slide's loader workers start when this slide's last batch arrives, so the device does not wait between slides.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy

from histoflow.common.config import plain, read_section
from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.common.files import atomic_path
from histoflow.common.machine import AUTO, resolve_workers
from histoflow.common.progress import progress_bar
from histoflow.data.fingerprint import content_hashes, sha256_file
from histoflow.data.locks import only_writer, writable
from histoflow.data.problems import Problem, write_problems
from histoflow.data.transforms import PatchTransform
from histoflow.features.embeddings import encoder_settings, prefetched
from histoflow.models import build_encoder, model_preprocess
from histoflow.slides.backend import DEFAULT_BACKEND, open_slide
from histoflow.slides.slide import DamagedTileError, SlideError, SlideSettingError
from histoflow.slides.table import SlideRecord, read_slide_table
from histoflow.slides.tiles import NoTissueError, SlideTiles, TileGeometry, stored_tiles, tile_loader, tissue_tiles

log = logging.getLogger(__name__)
FORMAT = 1
SHARDS = "shards"
HASHES = "hashes"  # each slide's sha256 by its file status (data.fingerprint), a file per slide path
BARRIER_TIMEOUT = timedelta(days=7)  # ranks wait this long for the slowest at the end (no collective before it)
ON_BAD = ("error", "skip")
STRATEGIES = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}  # embed.strategy -> start method
INDEX_COLUMNS = ["slide", "patient", "label", "tiles", "shard", "seconds", "sha256"]
# the slide settings that decide which tiles a slide gives and their pixels (not how fast they are read)
DECIDING = ("source_mpp", "tile_size", "level", "mpp", "stride", "min_tissue", "tissue_threshold", "thumbnail_size")
FIXES = {"no-mpp": "give the scan's resolution: slide.source_mpp=<microns per pixel> (0.25 at 40x, 0.5 at 20x)",
         "no-tissue": "lower slide.tissue_threshold (e.g. 0.02) or slide.min_tissue, or check that this is the slide",
         "unreadable": "copy or export the slide again, or remove it from the table",
         "setting": "change the slide setting named, or remove the slide from the table"}
# Held by a planning thread while it reads a slide, and by a loop while it forks loader workers: a worker forked while
# any thread of the process holds a lock it needs waits forever (Python 3.11's cached_property holds one per
# property, shared by every TIFF page; OpenSlide's C locks alike). One for the process, not one per loop: two jobs
# in one process (threads) fork beside each other's planners too. A planner starts on the next slide as its loop
# forks, mostly hashing it first, so a fork seldom waits.
READING = threading.Lock()


class NoMppError(SlideError):
    """The slide's file gives no microns per pixel and slide.source_mpp gives none either."""


class CohortSlideError(HistoflowError):
    """A slide of the cohort that cannot be embedded, under on_bad_image=error: the run stops naming it."""


@dataclass
class CohortSlideConfig:
    """How each slide is tiled and read (the `slide` section of embed.yaml; the keys of predict's `slide`)."""

    backend: str = DEFAULT_BACKEND  # auto | openslide | tifffile
    source_mpp: float | None = None  # the scan's microns per pixel, for slides whose file does not say
    tile_size: int = 224  # tile side in pixels at `mpp` (or `level`); resized to the encoder's input side if it has one
    level: int = 0  # pyramid level to read when mpp is null
    mpp: float | None = 0.5  # microns per pixel the tiles are read at (best level, resized): micron-true tiles
    stride: int | None = None  # grid step in the same pixels; null: tile_size (no overlap)
    min_tissue: float = 0.5  # share of a tile the tissue mask must cover
    tissue_threshold: float | None = None  # HSV saturation above which a thumbnail pixel is tissue; null: Otsu
    thumbnail_size: int = 1024  # longer side of the thumbnail the tissue mask is drawn on
    batch_size: int = 64  # tiles per forward pass
    num_workers: int | str = "auto"  # processes decoding tiles beside the encoder; auto: the CPUs per device less one,
    #                                  at least 1 (on a CPU too: decoding is small beside an encoder's forward)
    progress: bool = True  # bars over slides and tiles with tiles/s (rank 0)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CohortSlideConfig:
        return read_section(cls, cfg, "slide")


@dataclass
class CohortRunConfig:
    """Where the features go and how the work is shared out (the `embed` section of embed.yaml)."""

    out: str = "data/slide_features"  # the features folder (one sub-folder per encoder and settings)
    name: str | None = None  # the cohort's name (its index and problems files); null: the table's file name
    chunk: str | None = None  # i/n: this job embeds the i-th of n chunks of the table (a sweep: 1/4,2/4,3/4,4/4)
    accelerator: str = "auto"  # auto | cpu | gpu (Lightning Fabric's)
    devices: int = 1  # processes (devices) on this machine, each embedding its own slides
    num_nodes: int = 1  # machines of one job (SLURM starts one task per device)
    strategy: str = "ddp"  # several devices: ddp (processes started like this one) | ddp_spawn | ddp_fork

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CohortRunConfig:
        return read_section(cls, cfg, "embed")


@dataclass
class CohortJob:
    """What one process embeds: the table's slides it owns and everything needed to embed them (picklable, for the
    processes Lightning starts)."""

    records: list[tuple[int, SlideRecord]]  # (table row index, record) of this chunk, all ranks
    chunk: tuple[int, int]
    slide: CohortSlideConfig
    run: CohortRunConfig
    encoder: dict
    settings: dict
    folder: Path
    name: str
    table_sha: str
    on_bad_image: str = "error"


@dataclass
class CohortResult:
    """What a process did: its slides embedded, reused and left out; its pace; the index once complete."""

    folder: Path
    embedded: list[str] = field(default_factory=list)  # slides (as the table writes them) embedded by this process
    reused: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    tiles: int = 0  # tiles embedded here
    seconds: float = 0.0  # wall time of the slide loop
    waiting: float = 0.0  # of which the encoder waited for tiles
    index: Path | None = None  # the cohort index, where this process completed it
    rank: int = 0
    chunk: dict[str, int] = field(default_factory=dict)  # rank 0: slides embedded, reused, left out and tiles
    #                                                      embedded by every rank of this job

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / max(self.seconds, 1e-9)

    @property
    def wait_share(self) -> float:
        return self.waiting / max(self.seconds, 1e-9)


# ------------------------------------------------------------------------------------------------ sharing out


def balanced_bins(weights: Sequence[float], n: int) -> list[list[int]]:
    """Indices of `weights` in n bins of about equal total weight: heaviest first, each into the lightest bin so far
    (ties to the lower bin); each bin in index order. The same weights give the same bins in every process."""
    bins: list[list[int]] = [[] for _ in range(n)]
    totals = [0.0] * n
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        j = min(range(n), key=lambda b: (totals[b], b))
        bins[j].append(i)
        totals[j] += weights[i]
    return [sorted(b) for b in bins]


def parse_chunk(chunk: str | None) -> tuple[int, int]:
    """embed.chunk `i/n` as (i, n); null as (1, 1)."""
    if chunk is None:
        return 1, 1
    try:
        i, n = (int(part) for part in str(chunk).split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise ConfigError(f"embed.chunk={chunk!r}: expected i/n with 1 <= i <= n, e.g. embed.chunk=3/16 (a sweep: "
                          "embed.chunk=1/4,2/4,3/4,4/4)")
    return i, n


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # a missing file weighs nothing; it becomes a problem where its rank plans it


def chunk_of(records: Sequence[SlideRecord], chunk: tuple[int, int]) -> list[tuple[int, SlideRecord]]:
    """(table row index, record) of the table's i-th chunk of n, balanced by file size (a slide's tissue, roughly)."""
    i, n = chunk
    mine = balanced_bins([_size(r.path) for r in records], n)[i - 1]
    return [(k, records[k]) for k in mine]


# ------------------------------------------------------------------------------------------------ settings


def encoder_input(encoder_cfg: Mapping[str, Any], tile_size: int) -> tuple[int, PatchTransform, dict]:
    """The encoder's input side (its preprocess.input_size, else the tile size), the transform of uint8 tiles into
    it (its own mean and std) and the input settings that decide the vectors."""
    pre = model_preprocess(encoder_cfg, "encoder")
    if pre is None or pre.mean is None:
        raise ConfigError("the encoder has no input normalisation (encoder.preprocess.mean and std): a cohort's "
                          "features must not depend on the cohort. Fix: give encoder.preprocess.mean and std (timm "
                          "encoders take theirs with `auto`; ImageNet's: [0.485, 0.456, 0.406] and "
                          "[0.229, 0.224, 0.225])")
    side = pre.input_size or tile_size
    # tiles come at the input side already (read and resized by the slide reader): only the normalisation is left
    transform = PatchTransform(crop=None, stats={"mean_image": np.zeros((side, side, 3), np.float32)},
                               normalize="fixed", mean=pre.mean, std=pre.std)
    return side, transform, {"side": side, "mean": list(pre.mean), "std": list(pre.std)}


def cohort_settings(encoder_cfg: Mapping[str, Any], slide: CohortSlideConfig, out: Path) -> tuple[dict, Path]:
    """What decides a cohort's vectors besides each slide's content: the encoder (config, weights' sha256), its input
    and the tiling; and the folder they name, <out>/<encoder name>-<12 hex digits of their sha256>."""
    _, _, inputs = encoder_input(encoder_cfg, slide.tile_size)
    settings = encoder_settings(encoder_cfg, inputs, out)
    settings = {**settings, "kind": "slides", "slide": {k: getattr(slide, k) for k in DECIDING}}
    if slide.mpp is not None:
        settings["slide"]["level"] = None  # ignored when mpp is set
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    encoder = settings["encoder"]
    name = "".join(c if c.isalnum() or c in "_." else "_" for c in str(encoder.get("name") or "encoder")).strip("_")
    return settings, out / f"{name}-{digest}"


# ------------------------------------------------------------------------------------------------ one slide


@dataclass
class _Slide:
    """A slide of this process, planned: its shard, and its tiles where it is to be embedded, or its problem."""

    row: int
    record: SlideRecord
    sha: str = ""
    shard: Path | None = None
    tiles: SlideTiles | None = None
    mpp: float = 0.0
    dimensions: tuple[int, int] = (0, 0)
    problem: Problem | None = None
    error: HistoflowError | None = None


def _problem(record: SlideRecord, kind: str, error: BaseException) -> Problem:
    return Problem(str(record.slide), kind, str(error).replace(str(record.path) + ": ", ""))


def _plan(row: int, record: SlideRecord, job: CohortJob, side: int, transform: PatchTransform) -> _Slide:
    """Hash the slide, and where its shard is not there yet, find its tissue tiles (in the planning thread), the
    slide read under READING."""
    cfg, planned = job.slide, _Slide(row, record)
    try:
        # one small cache file per slide path: no job rewrites, or races over, a cohort-wide file for every slide
        cache = job.folder / HASHES / f"{hashlib.sha256(str(record.path).encode()).hexdigest()[:24]}.json"
        planned.sha = content_hashes([record.path], cache)[0]
        planned.shard = job.folder / SHARDS / f"{planned.sha}.npz"
        if planned.shard.is_file():
            return planned
        with READING, open_slide(record.path, cfg.backend, cfg.source_mpp) as slide:
            if slide.mpp is None:
                raise NoMppError(f"{record.path}: the file gives no microns per pixel, and tile coordinates are in "
                                 "microns too. Fix: slide.source_mpp=<the scan's microns per pixel> (0.25 at 40x)")
            geometry = TileGeometry.of(slide, cfg.tile_size, cfg.level, cfg.mpp, cfg.stride, out_size=side)
            thumbnail = slide.thumbnail(cfg.thumbnail_size)
            origins = tissue_tiles(slide, geometry, cfg.min_tissue, cfg.tissue_threshold, thumbnail)
            planned.mpp, planned.dimensions = float(slide.mpp), slide.dimensions
        planned.tiles = SlideTiles(record.path, origins, geometry, cfg.batch_size, transform, cfg.backend,
                                   cfg.source_mpp)
    except NoTissueError as e:
        planned.problem, planned.error = _problem(record, "no-tissue", e), e
    except (HistoflowError, OSError) as e:
        kind = ("no-mpp" if isinstance(e, NoMppError) else "setting" if isinstance(e, SlideSettingError)
                else "unreadable")
        planned.problem = _problem(record, kind, e)
        planned.error = e if isinstance(e, HistoflowError) else SlideError(f"{record.path}: {e}")
    return planned


def write_shard(path: Path, features: np.ndarray, coords_px: np.ndarray, coords_um: np.ndarray,
                meta: Mapping[str, Any]) -> None:
    """A slide's shard, whole or not at all: written to a temporary name, fsynced, renamed, its folder fsynced."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, features=features, coords_px=coords_px, coords_um=coords_um,
                 meta=np.array(json.dumps(meta, sort_keys=True)))


def read_shard(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A slide's shard: features, coords_px, coords_um (numpy arrays) and meta (a dict)."""
    with np.load(path) as npz:
        return {"features": npz["features"], "coords_px": npz["coords_px"], "coords_um": npz["coords_um"],
                "meta": json.loads(str(npz["meta"]))}


def shard_meta(path: Path) -> dict[str, Any]:
    with np.load(path) as npz:
        return json.loads(str(npz["meta"]))


class _Loop:
    """The slides of one process through the encoder, one after another, the next one's loader started early."""

    def __init__(self, job: CohortJob, mine: list[tuple[int, SlideRecord]], device: torch.device, rank: int,
                 world: int = 1) -> None:
        self.job, self.mine, self.device, self.rank = job, mine, device, rank
        self.side, self.transform, _ = encoder_input(job.encoder, job.slide.tile_size)
        self.encoder, self.dim = build_encoder(job.encoder, self.side)
        self.encoder = self.encoder.to(device)
        # auto: as beside a GPU (the CPUs per process less one), and at least one on a CPU too, where decoding a
        # tile costs little beside the encoder's forward and would otherwise add to it
        workers = resolve_workers(job.slide.num_workers, "slide.num_workers", "cuda", processes=world)
        self.workers = max(1, workers) if job.slide.num_workers == AUTO else workers
        self.result = CohortResult(job.folder, rank=rank)
        self.rows: list[dict[str, Any]] = []
        self.problems: list[tuple[int, Problem]] = []
        self.done: set[str] = set()  # shas embedded or found by this process
        self.stop: CohortSlideError | None = None  # a bad slide under on_bad_image=error

    def _settle(self, planned: _Slide) -> None:
        """A slide not embedded here: found done (reused), or a problem (left out, or the run stops)."""
        if planned.problem is not None:
            if self.job.on_bad_image == "error":  # raised once the slide being embedded is written
                self.stop = CohortSlideError(f"{planned.error} (or embed with on_bad_image=skip to leave such slides "
                                             "out, listed in the cohort's problems.csv)")
                self.stop.__cause__ = planned.error
                return
            log.warning("%s left out (%s): %s", planned.record.slide, planned.problem.kind, planned.problem.detail)
            self.problems.append((planned.row, planned.problem))
            self.result.problems.append(planned.problem)
            return
        assert planned.shard is not None
        self._row(planned, shard_meta(planned.shard))
        self.result.reused.append(planned.record.slide)

    def _row(self, planned: _Slide, meta: Mapping[str, Any]) -> None:
        assert planned.shard is not None
        record = planned.record
        self.done.add(planned.sha)
        self.rows.append({"row": planned.row, "slide": record.slide, "patient": record.patient, "label": record.label,
                          "tiles": meta["tiles"], "shard": f"{SHARDS}/{planned.shard.name}",
                          "seconds": meta["seconds"], "sha256": planned.sha, **record.extra})

    def run(self) -> CohortResult:
        """Every slide of this process: first those no other process is embedding (a slide whose lock another job
        holds is put off), then the ones put off, waiting for their locks (and then finding most of them done)."""
        job, cfg = self.job, self.job.slide
        plans = prefetched(_plan(row, record, job, self.side, self.transform)
                           for row, record in self.mine)
        t0 = time.perf_counter()
        with progress_bar(cfg.progress and self.rank == 0) as bar:
            slides_bar = bar.add_task("slides", total=len(self.mine), rate="")
            tiles_bar = bar.add_task("tiles", total=None, rate="")
            self._bar = (bar, slides_bar, tiles_bar, t0)
            self.put_off: list[_Slide] = []
            self._pass(plans, wait=False)
            if self.put_off and self.stop is None:
                log.info("%d slides were being embedded by another job: waiting for it", len(self.put_off))
                self._pass(iter(self.put_off), wait=True)
        self.result.seconds = time.perf_counter() - t0
        if self.stop is not None:
            raise self.stop
        return self.result

    def _pass(self, plans: Iterator[_Slide], wait: bool) -> None:
        pin, (bar, slides_bar, _, _) = self.device.type == "cuda", self._bar

        def next_to_embed() -> tuple[_Slide, Iterator] | None:
            for planned in plans:
                if planned.tiles is None:
                    self._settle(planned)
                    if self.stop is not None:
                        return None
                elif planned.sha in self.done or planned.shard.is_file():  # a copy's, or another job's meanwhile
                    self._settle_later(planned)
                else:
                    with READING:  # no fork while a planner reads a slide
                        return planned, iter(tile_loader(planned.tiles, self.workers, pin_memory=pin))
                bar.update(slides_bar, completed=len(self.rows) + len(self.problems))
            return None

        current = next_to_embed()
        while current is not None:
            planned, batches = current
            nxt = self._embed(planned, batches, next_to_embed, wait)
            del batches, current  # its workers end
            current = None if self.stop is not None else nxt() if callable(nxt) else nxt
            bar.update(slides_bar, completed=len(self.rows) + len(self.problems))

    def _settle_later(self, planned: _Slide) -> None:
        """A slide whose content this process has just embedded under another row (a copy): the same shard."""
        assert planned.shard is not None
        self._row(planned, shard_meta(planned.shard))
        self.result.reused.append(planned.record.slide)

    @torch.inference_mode()
    def _embed(self, planned: _Slide, batches: Iterator, next_to_embed: Callable, wait: bool) -> Any:
        """Embed one slide into its shard (unless another process did meanwhile, or, without `wait`, is doing it now:
        then it is put off); returns the next slide's started loader, or the function that finds it when this slide
        ended before its last batch."""
        assert planned.tiles is not None and planned.shard is not None
        tiles, record, gpu = planned.tiles, planned.record, self.device.type == "cuda"
        bar, slides_bar, tiles_bar, t_start = self._bar
        shards = planned.shard.parent
        shards.mkdir(parents=True, exist_ok=True)
        nxt: Any = next_to_embed
        with only_writer(self.job.folder / "locks" / f"{planned.sha}.lock", f"embeds {record.slide}", wait) as mine:
            if not mine:  # another job is embedding this slide: the next one first, this one at the end
                self.put_off.append(planned)
                return nxt
            if planned.shard.is_file():  # another job embedded it while this one planned or waited
                self._settle_later(planned)
                return nxt
            for leftover in shards.glob(f".{planned.shard.name}.*.tmp"):  # a killed writer's (the lock is ours now)
                leftover.unlink()
            t0 = time.perf_counter()
            n, batch = len(tiles.origins), tiles.batch_size
            features = np.empty((n, self.dim), np.float32)
            pending: tuple[int, torch.Tensor, Any] | None = None
            got, done = 0, 0
            bar.update(tiles_bar, description=f"tiles of {Path(record.slide).name}", total=n, completed=0)
            while True:
                waited = time.perf_counter()
                item = next(batches, None)
                self.result.waiting += time.perf_counter() - waited
                if item is None:
                    break
                index, x, damaged = item
                got += 1
                if got == len(tiles):  # the last batch: the next slide's workers start reading while it runs
                    waited = time.perf_counter()
                    nxt = next_to_embed()
                    self.result.waiting += time.perf_counter() - waited
                if damaged:
                    error = DamagedTileError(record.path, stored_tiles(damaged))
                    planned.problem, planned.error = _problem(record, "unreadable", error), error
                    self._settle(planned)
                    return nxt
                vectors = self.encoder(x.to(self.device, non_blocking=gpu)).float().to("cpu", non_blocking=gpu)
                ready = torch.cuda.Event() if gpu else None
                if ready is not None:
                    ready.record()
                if pending is not None:
                    done += self._store(features, *pending, batch)
                pending = index, vectors, ready
                self.result.tiles += x.shape[0]
                elapsed = time.perf_counter() - t_start
                bar.update(tiles_bar, completed=done, rate=f"{self.result.tiles / elapsed:.0f} tiles/s")
            if pending is not None:
                done += self._store(features, *pending, batch)
            bar.update(tiles_bar, completed=done)
            origins = tiles.origins
            seconds = round(time.perf_counter() - t0, 3)
            meta = {"format": FORMAT, "slide": str(record.path), "sha256": planned.sha, "tiles": n, "dim": self.dim,
                    "mpp": planned.mpp, "dimensions": list(planned.dimensions), "geometry": asdict(tiles.geometry),
                    "tile_um": tiles.geometry.read_size * tiles.geometry.downsample * planned.mpp,
                    "settings": self.job.settings, "seconds": seconds, "device": str(self.device),
                    "embedded_by": f"{socket.gethostname()}:{os.getpid()}:rank {self.rank}"}
            write_shard(planned.shard, features, origins.astype(np.int64), origins * planned.mpp, meta)
        log.info("%s: %d tiles in %.1f s (%.0f tiles/s) -> %s", record.slide, n, seconds, n / max(seconds, 1e-9),
                 planned.shard.name)
        self._row(planned, meta)
        self.result.embedded.append(record.slide)
        return nxt

    @staticmethod
    def _store(features: np.ndarray, index: int, vectors: torch.Tensor, ready: Any, batch: int) -> int:
        if ready is not None:
            ready.synchronize()  # the copy off the device has landed
        features[index * batch:index * batch + len(vectors)] = vectors.numpy()
        return len(vectors)


# ------------------------------------------------------------------------------------------------ parts and index


def _parts(job: CohortJob) -> Path:
    return job.folder / "parts" / job.name


def _part_name(job: CohortJob, rank: tuple[str, int, int] | None = None) -> str:
    """The chunk's part, or (rank=(run id, rank, world)) one rank's part of it: named by the run too, so two jobs
    running the same chunk at once never read or remove each other's."""
    i, n = job.chunk
    base = f"{job.table_sha[:12]}-chunk-{i:04d}-of-{n:04d}"
    return f"{base}.json" if rank is None else f"{base}.run-{rank[0]}.rank-{rank[1]}-of-{rank[2]}.json"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value))


def _part(loop: _Loop) -> dict[str, Any]:
    return {"table_sha256": loop.job.table_sha, "chunk": list(loop.job.chunk), "rows": loop.rows,
            "problems": [{"row": row, **asdict(p)} for row, p in loop.problems],
            "embedded": [{"slide": s, "rank": loop.rank} for s in loop.result.embedded],
            "reused": [{"slide": s, "rank": loop.rank} for s in loop.result.reused], "tiles": loop.result.tiles}


def combine_ranks(job: CohortJob, run_id: str, world: int) -> dict[str, Any]:
    """The chunk's part from the parts of this run's ranks (rank 0, after the barrier)."""
    names = [_part_name(job, (run_id, r, world)) for r in range(world)]
    parts = [json.loads((_parts(job) / name).read_text()) for name in names]
    chunk = {"table_sha256": job.table_sha, "chunk": list(job.chunk),
             "rows": sorted((row for p in parts for row in p["rows"]), key=lambda r: r["row"]),
             "problems": sorted((q for p in parts for q in p["problems"]), key=lambda q: q["row"]),
             "embedded": [e for p in parts for e in p["embedded"]], "reused": [e for p in parts for e in p["reused"]],
             "tiles": sum(p["tiles"] for p in parts)}
    _write_json(_parts(job) / _part_name(job), chunk)
    for name in names:
        (_parts(job) / name).unlink()
    return chunk


def merge_index(folder: Path, name: str, table_sha: str, chunks: int) -> Path | None:
    """The cohort index and problems table from every chunk's part, once all `chunks` are there (None before: the
    last chunk to finish writes them). Rows in the table's order; each row's shard checked to be there."""
    with only_writer(folder / "locks" / f"{name}.merge.lock", f"merges the index of {name}"):
        parts = []
        for i in range(1, chunks + 1):
            path = folder / "parts" / name / f"{table_sha[:12]}-chunk-{i:04d}-of-{chunks:04d}.json"
            if not path.is_file():
                log.info("the index of %s waits for chunk %d/%d (%s)", name, i, chunks, path)
                return None
            parts.append(json.loads(path.read_text()))
        rows = sorted((row for p in parts for row in p["rows"]), key=lambda r: r["row"])
        missing = [r["shard"] for r in rows if not (folder / r["shard"]).is_file()]
        if missing:
            raise HistoflowError(f"{folder}: the chunks' parts name shards that are not there ({missing[0]} ...). "
                                 "Fix: run the embedding again (it embeds only what is missing)")
        extra = [c for r in rows for c in r if c not in INDEX_COLUMNS and c != "row"]
        columns = INDEX_COLUMNS + list(dict.fromkeys(extra))
        index = folder / f"{name}.index.csv"
        with atomic_path(index) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, lineterminator="\n", restval="")
            writer.writeheader()
            writer.writerows({k: v for k, v in r.items() if k != "row"} for r in rows)
        problems = sorted((q for p in parts for q in p["problems"]), key=lambda q: q["row"])
        with atomic_path(folder / f"{name}.problems.csv") as tmp:
            write_problems(tmp, skipped=[Problem(q["path"], q["kind"], q["detail"]) for q in problems])
    log.info("cohort index: %s (%d slides; %d left out, listed in %s.problems.csv)", index, len(rows), len(problems),
             name)
    return index


# ------------------------------------------------------------------------------------------------ the run


def run_rank(fabric: Any, job: CohortJob) -> CohortResult:
    """One process's part: its ranks' share of the chunk, then (rank 0, after the barrier) the chunk's part and, when
    every chunk is there, the index. `fabric`: Lightning Fabric (rank, world size, device, barrier)."""
    rank, world = fabric.global_rank, fabric.world_size
    run_id = fabric.broadcast(uuid.uuid4().hex[:12], src=0)  # rank 0's: the ranks' parts are this run's
    mine = [job.records[k] for k in balanced_bins([_size(r.path) for _, r in job.records], world)[rank]]
    loop = _Loop(job, mine, fabric.device, rank, world)
    result = loop.run()
    _write_json(_parts(job) / _part_name(job, (run_id, rank, world)), _part(loop))
    log.info("rank %d: %d slides embedded, %d reused, %d left out; %d tiles in %.1f s (%.0f tiles/s, the encoder "
             "waited for tiles %.0f%% of the time)", rank, len(result.embedded), len(result.reused),
             len(result.problems), result.tiles, result.seconds, result.tiles_per_s, 100 * result.wait_share)
    if world > 1:
        fabric.barrier()  # every rank has written its part (the other collective: the run id, at the start)
    if rank == 0:
        chunk = combine_ranks(job, run_id, world)
        result.chunk = {"embedded": len(chunk["embedded"]), "reused": len(chunk["reused"]),
                        "left_out": len(chunk["problems"]), "tiles": chunk["tiles"]}
        result.index = merge_index(job.folder, job.name, job.table_sha, job.chunk[1])
    return result


def prepare_job(table: str | os.PathLike[str], encoder_cfg: Mapping[str, Any], slide_cfg: Mapping[str, Any] | None,
                run_cfg: Mapping[str, Any] | None, on_bad_image: str = "error") -> CohortJob:
    """Read and check everything a run needs before any process starts: the table, the settings, the folder."""
    if on_bad_image not in ON_BAD:
        raise ConfigError(f"on_bad_image={on_bad_image!r}: expected error (stop, naming the slide) or skip (leave it "
                          "out, listed in the cohort's problems.csv)")
    slide, run = CohortSlideConfig.from_config(slide_cfg), CohortRunConfig.from_config(run_cfg)
    table = Path(table)
    records = read_slide_table(table)
    chunk = parse_chunk(run.chunk)
    out = Path(run.out)
    writable(out, "the slide features", "set embed.out to a folder you can write (or paths.data_dir)")
    encoder = dict(plain(encoder_cfg))
    settings, folder = cohort_settings(encoder, slide, out)
    writable(folder, "the slide features", "set embed.out to a folder you can write")
    settings_file = folder / "settings.json"
    if not settings_file.is_file():
        _write_json(settings_file, settings)
    return CohortJob(chunk_of(records, chunk), chunk, slide, run, encoder, settings, folder,
                     run.name or table.stem, sha256_file(table), on_bad_image)


def embed_cohort(table: str | os.PathLike[str], encoder_cfg: Mapping[str, Any],
                 slide_cfg: Mapping[str, Any] | None = None, run_cfg: Mapping[str, Any] | None = None,
                 on_bad_image: str = "error") -> CohortResult:
    """Embed the slides of a slide table (this job's chunk of it) on this job's devices; rank 0's result (with the
    index where this job completed it)."""
    job = prepare_job(table, encoder_cfg, slide_cfg, run_cfg, on_bad_image)
    run = job.run
    strategy: Any = "auto"
    if run.devices * run.num_nodes > 1:
        if run.strategy not in STRATEGIES:
            raise ConfigError(f"embed.strategy={run.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        strategy = DDPStrategy(start_method=STRATEGIES[run.strategy], timeout=BARRIER_TIMEOUT)
    fabric = Fabric(accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes, strategy=strategy)
    return fabric.launch(run_rank, job)
