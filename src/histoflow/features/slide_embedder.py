"""The slides of one process through a frozen encoder, one after another, each into its slide feature file
(features/slide_features.py), named by the sha256 of the slide file's bytes (docs/cohorts.md).

A slide's features are named by the sha256 of every byte of its file (a re-scan or re-export is another slide; a
copy or a move is the same one), in a folder named by the settings, so an unchanged slide is embedded once whatever
its path, and a changed one again. The hash of a file whose status (size, times, inode) has not changed is
remembered (data.fingerprint), so a rerun reads no slide twice; a moved slide is read once more, to hash it.

Each file is written to a temporary name, fsynced and renamed, under a lock of its own (data.locks.only_writer): a
killed run leaves whole files only, and two jobs on one folder never embed a slide twice (the second waits for the
first, then finds the file). No collective runs inside the per-slide loop, so ranks with unequal slides never hang.

Within a process, a thread plans the next slide (hash, tissue mask, tile grid) while this one is embedded, and the
next slide's loader workers start when this slide's last batch arrives, so the device does not wait between slides.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from histoflow.common.errors import HistoflowError
from histoflow.common.machine import AUTO, resolve_workers
from histoflow.common.progress import progress_bar
from histoflow.data.fingerprint import content_hashes
from histoflow.data.locks import only_writer
from histoflow.data.problems import Problem
from histoflow.data.transforms import PatchTransform
from histoflow.features.cohort_job import (
    CohortJob,
    CohortResult,
    CohortSlideError,
    NoMppError,
    encoder_input,
    index_columns,
)
from histoflow.features.embeddings import prefetched
from histoflow.features.slide_features import (
    FORMAT,
    SHARDS,
    DamagedSlideFeaturesError,
    slide_features_meta,
    slide_features_path,
    write_slide_features,
)
from histoflow.models import build_encoder
from histoflow.slides.backend import open_slide
from histoflow.slides.slide import DamagedTileError, SlideError, SlideSettingError
from histoflow.slides.table import SlideRecord
from histoflow.slides.tiles import NoTissueError, SlideTiles, TileGeometry, stored_tiles, tile_loader, tissue_tiles

log = logging.getLogger(__name__)
HASHES = "hashes"  # each slide's sha256 by its file status (data.fingerprint), a file per slide path
# Held by a planning thread while it reads a slide, and by an embedder while it forks loader workers: a worker forked
# while any thread of the process holds a lock it needs waits forever (Python 3.11's cached_property holds one per
# property, shared by every TIFF page; OpenSlide's C locks alike). One for the process, not one per embedder: two
# jobs in one process (threads) fork beside each other's planners too. A planner starts on the next slide as its
# embedder forks, mostly hashing it first, so a fork seldom waits.
READING = threading.Lock()


@dataclass
class PlannedSlide:
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


def problem_of(record: SlideRecord, kind: str, error: BaseException) -> Problem:
    return Problem(str(record.slide), kind, str(error).replace(str(record.path) + ": ", ""))


def usable(shard: Path, say: bool = False) -> bool:
    """A slide feature file there and readable; a damaged one (cut short by a full disk or a copy) is embedded
    again, written whole over it (`say`: logged)."""
    if not shard.is_file():
        return False
    try:
        slide_features_meta(shard)
    except DamagedSlideFeaturesError as e:
        if say:
            log.warning("%s; it is embedded again now", str(e).split(". Fix:")[0])
        return False
    return True


def plan_slide(row: int, record: SlideRecord, job: CohortJob, side: int, transform: PatchTransform,
               device: torch.device | None = None) -> PlannedSlide:
    """Hash the slide, and where its shard is not there yet, find its tissue tiles (in the planning thread), the
    slide read under READING; its stored JPEG tiles decoded on `device` as slide.decode says."""
    cfg, planned = job.slide, PlannedSlide(row, record)
    try:
        # one small cache file per slide path: no job rewrites, or races over, a cohort-wide file for every slide
        cache = job.folder / HASHES / f"{hashlib.sha256(str(record.path).encode()).hexdigest()[:24]}.json"
        planned.sha = content_hashes([record.path], cache)[0]
        # the table's mpp of a slide tiles it otherwise than its file's: another feature file
        planned.shard = slide_features_path(job.folder, planned.sha, record.mpp)
        if usable(planned.shard, say=True):
            return planned
        with READING, open_slide(record.path, cfg.backend, cfg.source_mpp, mpp=record.mpp) as slide:
            if slide.mpp is None:
                raise NoMppError(f"{record.path}: the file gives no microns per pixel, and tile coordinates are in "
                                 "microns too. Fix: slide.source_mpp=<the scan's microns per pixel> (0.25 at 40x)")
            geometry = TileGeometry.of(slide, cfg.side, cfg.level, cfg.mpp, cfg.stride, out_size=side)
            thumbnail = slide.thumbnail(cfg.thumbnail_size)
            origins = tissue_tiles(slide, geometry, cfg.min_tissue, cfg.tissue_threshold, thumbnail)
            planned.mpp, planned.dimensions = float(slide.mpp), slide.dimensions
            planned.tiles = SlideTiles(record.path, origins, geometry, cfg.batch_size, transform, cfg.backend,
                                       cfg.source_mpp, cfg.decode, device)
    except NoTissueError as e:
        planned.problem, planned.error = problem_of(record, "no-tissue", e), e
    except (HistoflowError, OSError) as e:
        kind = ("no-mpp" if isinstance(e, NoMppError) else "setting" if isinstance(e, SlideSettingError)
                else "unreadable")
        planned.problem = problem_of(record, kind, e)
        planned.error = e if isinstance(e, HistoflowError) else SlideError(f"{record.path}: {e}")
    return planned


class SlideEmbedder:
    """The slides of one process through the encoder, one after another, the next one's loader started early."""

    def __init__(self, job: CohortJob, mine: list[tuple[int, SlideRecord]], device: torch.device, rank: int,
                 world: int = 1) -> None:
        self.job, self.mine, self.device, self.rank = job, mine, device, rank
        self.side, self.transform, _ = encoder_input(job.encoder, job.slide.side)
        self.encoder, self.dim = build_encoder(job.encoder, self.side)
        self.encoder = self.encoder.to(device)
        # auto: as beside a GPU (the CPUs per process less one), and at least one on a CPU too, where decoding a
        # tile costs little beside the encoder's forward and would otherwise add to it
        workers = resolve_workers(job.slide.num_workers, "slide.num_workers", "cuda", processes=world)
        self.workers = max(1, workers) if job.slide.num_workers == AUTO else workers
        self.result = CohortResult(job.folder, rank=rank)
        self.rows: list[dict[str, Any]] = []
        self.problems: list[tuple[int, Problem]] = []
        self.done: set[str] = set()  # feature files (names) embedded or found by this process
        self.stop: CohortSlideError | None = None  # a bad slide under on_bad_image=error

    def _skip_or_reuse(self, planned: PlannedSlide) -> None:
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
        self._add_row(planned, slide_features_meta(planned.shard))
        self.result.reused.append(planned.record.slide)

    def _add_row(self, planned: PlannedSlide, meta: Mapping[str, Any]) -> None:
        assert planned.shard is not None
        record = planned.record
        self.done.add(planned.shard.name)
        # the table's own columns never overwrite the index's (a column `shard` would point every bag elsewhere)
        self.rows.append({**index_columns(record.extra), "row": planned.row, "slide": record.slide,
                          "patient": record.patient, "label": record.label, "tiles": meta["tiles"],
                          "shard": f"{SHARDS}/{planned.shard.name}", "seconds": meta["seconds"],
                          "sha256": planned.sha})

    def run(self) -> CohortResult:
        """Every slide of this process: first those no other process is embedding (a slide whose lock another job
        holds is put off), then the ones put off, waiting for their locks (and then finding most of them done)."""
        job, cfg = self.job, self.job.slide
        plans = prefetched(plan_slide(row, record, job, self.side, self.transform, self.device)
                           for row, record in self.mine)
        t0 = time.perf_counter()
        with progress_bar(cfg.progress and self.rank == 0) as bar:
            slides_bar = bar.add_task("slides", total=len(self.mine), rate="")
            tiles_bar = bar.add_task("tiles", total=None, rate="")
            self._bars = (bar, slides_bar, tiles_bar, t0)
            self.held_elsewhere: list[PlannedSlide] = []
            self._embed_in_turn(plans, wait=False)
            if self.held_elsewhere and self.stop is None:
                log.info("%d slides were being embedded by another job: waiting for it", len(self.held_elsewhere))
                self._embed_in_turn(iter(self.held_elsewhere), wait=True)
        self.result.seconds = time.perf_counter() - t0
        if self.stop is not None:
            raise self.stop
        return self.result

    def _embed_in_turn(self, plans: Iterator[PlannedSlide], wait: bool) -> None:
        """Each planned slide in turn: embedded, reused or left out; `wait`: for a lock another job holds."""
        pin, (bar, slides_bar, _, _) = self.device.type == "cuda", self._bars

        def next_to_embed() -> tuple[PlannedSlide, Iterator] | None:
            for planned in plans:
                if planned.tiles is None:
                    self._skip_or_reuse(planned)
                    if self.stop is not None:
                        return None
                elif planned.shard.name in self.done or usable(planned.shard):  # a copy's, or another job's
                    self._reuse(planned)
                else:
                    with READING:  # no fork while a planner reads a slide
                        return planned, iter(tile_loader(planned.tiles, self.workers, pin_memory=pin))
                bar.update(slides_bar, completed=len(self.rows) + len(self.problems))
            return None

        current = next_to_embed()
        while current is not None:
            planned, batches = current
            nxt = self._embed_slide(planned, batches, next_to_embed, wait)
            del batches, current  # its workers end
            current = None if self.stop is not None else nxt() if callable(nxt) else nxt
            bar.update(slides_bar, completed=len(self.rows) + len(self.problems))

    def _reuse(self, planned: PlannedSlide) -> None:
        """A slide whose content is embedded already (a copy of one this process embedded under another row, or
        another job's meanwhile): the same shard."""
        assert planned.shard is not None
        self._add_row(planned, slide_features_meta(planned.shard))
        self.result.reused.append(planned.record.slide)

    @torch.inference_mode()
    def _embed_slide(self, planned: PlannedSlide, batches: Iterator, next_to_embed: Callable, wait: bool) -> Any:
        """Embed one slide into its shard (unless another process did meanwhile, or, without `wait`, is doing it now:
        then it is put off); returns the next slide's started loader, or the function that finds it when this slide
        ended before its last batch."""
        assert planned.tiles is not None and planned.shard is not None
        tiles, record, gpu = planned.tiles, planned.record, self.device.type == "cuda"
        bar, slides_bar, tiles_bar, t_start = self._bars
        shards = planned.shard.parent
        shards.mkdir(parents=True, exist_ok=True)
        nxt: Any = next_to_embed
        lock = self.job.folder / "locks" / f"{planned.shard.stem}.lock"
        with only_writer(lock, f"embeds {record.slide}", wait) as mine:
            if not mine:  # another job is embedding this slide: the next one first, this one at the end
                self.held_elsewhere.append(planned)
                return nxt
            if usable(planned.shard):  # another job embedded it while this one planned or waited
                self._reuse(planned)
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
                    planned.problem, planned.error = problem_of(record, "unreadable", error), error
                    self._skip_or_reuse(planned)
                    return nxt
                vectors = self.encoder(x.to(self.device, non_blocking=gpu)).float().to("cpu", non_blocking=gpu)
                ready = torch.cuda.Event() if gpu else None
                if ready is not None:
                    ready.record()
                if pending is not None:
                    done += self._copy_batch(features, *pending, batch)
                pending = index, vectors, ready
                self.result.tiles += x.shape[0]
                elapsed = time.perf_counter() - t_start
                bar.update(tiles_bar, completed=done, rate=f"{self.result.tiles / elapsed:.0f} tiles/s")
            if pending is not None:
                done += self._copy_batch(features, *pending, batch)
            bar.update(tiles_bar, completed=done)
            origins = tiles.origins
            seconds = round(time.perf_counter() - t0, 3)
            meta = {"format": FORMAT, "slide": str(record.path), "sha256": planned.sha, "tiles": n, "dim": self.dim,
                    "mpp": planned.mpp, "dimensions": list(planned.dimensions), "geometry": asdict(tiles.geometry),
                    "tile_um": tiles.geometry.read_size * tiles.geometry.downsample * planned.mpp,
                    "settings": self.job.settings, "seconds": seconds, "device": str(self.device),
                    "embedded_by": f"{socket.gethostname()}:{os.getpid()}:rank {self.rank}"}
            write_slide_features(planned.shard, features, origins.astype(np.int64), origins * planned.mpp, meta)
        log.info("%s: %d tiles in %.1f s (%.0f tiles/s) -> %s", record.slide, n, seconds, n / max(seconds, 1e-9),
                 planned.shard.name)
        self._add_row(planned, meta)
        self.result.embedded.append(record.slide)
        return nxt

    @staticmethod
    def _copy_batch(features: np.ndarray, index: int, vectors: torch.Tensor, ready: Any, batch: int) -> int:
        """Batch `index`'s vectors into the slide's features, once their copy off the device has landed."""
        if ready is not None:
            ready.synchronize()
        features[index * batch:index * batch + len(vectors)] = vectors.numpy()
        return len(vectors)

    def part(self) -> dict[str, Any]:
        """This process's part of its chunk (features.cohort_index.combine_ranks reads it)."""
        return {"table_sha256": self.job.table_sha, "chunk": list(self.job.chunk), "rows": self.rows,
                "problems": [{"row": row, **asdict(p)} for row, p in self.problems],
                "embedded": [{"slide": s, "rank": self.rank} for s in self.result.embedded],
                "reused": [{"slide": s, "rank": self.rank} for s in self.result.reused], "tiles": self.result.tiles}
