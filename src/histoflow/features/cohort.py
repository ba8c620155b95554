"""A cohort of whole slides through a frozen encoder, once: every tissue tile of every slide of a slide table, into one
feature file per slide and a cohort index (`histoflow embed slides=<table.csv> encoder=...`, docs/cohorts.md).

This module launches the work: `prepare_job` reads and checks everything before any process starts (the table, the
config sections and settings of features/cohort_job.py, the folder), `embed_cohort` starts this job's processes
(Lightning Fabric ranks), and `run_rank` is one process's part: its share of the chunk (features/cohort_index.py)
through the encoder (features/slide_embedder.py), then, on rank 0 after the one barrier, the chunk's part and,
once every chunk has written, the index.

    <embed.out>/<encoder>-<settings key>/   settings.json: what the key hashes (features/cohort_job.py)
        shards/<slide sha256>.npz           one slide's features and tile coordinates (features/slide_features.py)
        <name>.index.csv, .problems.csv     the slides embedded and left out (features/cohort_index.py)
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError
from histoflow.data.fingerprint import sha256_file
from histoflow.data.locks import writable
from histoflow.features.cohort_index import (
    check_index_table,
    chunk_of,
    combine_ranks,
    merge_index,
    parse_chunk,
    part_name,
    parts_folder,
    rank_share,
    write_json,
)
from histoflow.features.cohort_job import (
    OWN,
    CohortJob,
    CohortResult,
    CohortRunConfig,
    CohortSlideConfig,
    cohort_settings,
    say_resize,
)
from histoflow.features.slide_embedder import SlideEmbedder
from histoflow.models.weights_file import check_encoder_weights
from histoflow.slides.table import SlideRecord, read_slide_table

log = logging.getLogger(__name__)
BARRIER_TIMEOUT = timedelta(days=7)  # ranks wait this long for the slowest at the end (no collective before it)
ON_BAD = ("error", "skip")
STRATEGIES = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}  # embed.strategy -> start method


def run_rank(fabric: Any, job: CohortJob) -> CohortResult:
    """One process's part: its ranks' share of the chunk, then (rank 0, after the barrier) the chunk's part and, when
    every chunk is there, the index. `fabric`: Lightning Fabric (rank, world size, device, barrier)."""
    rank, world = fabric.global_rank, fabric.world_size
    run_id = fabric.broadcast(uuid.uuid4().hex[:12], src=0)  # rank 0's: the ranks' parts are this run's
    embedder = SlideEmbedder(job, rank_share(job.records, rank, world), fabric.device, rank, world)
    result = embedder.run()
    write_json(parts_folder(job) / part_name(job, (run_id, rank, world)), embedder.part())
    log.info("rank %d: %d slides embedded, %d reused, %d left out; %d tiles in %.1f s (%.0f tiles/s, the encoder "
             "waited for tiles %.0f%% of the time)", rank, len(result.embedded), len(result.reused),
             len(result.problems), result.tiles, result.seconds, result.tiles_per_s, 100 * result.wait_share)
    if world > 1:
        fabric.barrier()  # every rank has written its part (the other collective: the run id, at the start)
    if rank == 0:
        chunk = combine_ranks(job, run_id, world)
        result.chunk = {"embedded": len(chunk["embedded"]), "reused": len(chunk["reused"]),
                        "left_out": len(chunk["problems"]), "tiles": chunk["tiles"]}
        result.index = merge_index(job.folder, job.name, job.table_sha, job.chunk[1], job.table)
    return result


def prepare_job(table: str | os.PathLike[str], encoder_cfg: Mapping[str, Any], slide_cfg: Mapping[str, Any] | None,
                run_cfg: Mapping[str, Any] | None, on_bad_image: str = "error") -> CohortJob:
    """Read and check everything a run needs before any process starts: the table, the settings, the folder."""
    if on_bad_image not in ON_BAD:
        raise ConfigError(f"on_bad_image={on_bad_image!r}: expected error (stop, naming the slide) or skip (leave it "
                          "out, listed in the cohort's problems.csv)")
    slide, run = CohortSlideConfig.from_config(slide_cfg), CohortRunConfig.from_config(run_cfg)
    table = Path(table)
    name = check_name(run.name) if run.name else table.stem
    check_accelerator(run.accelerator)
    records = read_slide_table(table, labelled=False)  # features need no label; training checks its own
    say_renamed_columns(records, table)
    chunk = parse_chunk(run.chunk)
    out = Path(run.out)
    encoder = dict(to_builtin(encoder_cfg))
    check_encoder_weights(encoder)  # a damaged weights file fails here, before any folder is made for its features
    writable(out, "the slide features", "set embed.out to a folder you can write (or paths.data_dir)")
    settings, folder = cohort_settings(encoder, slide, out)
    say_resize(encoder, slide)
    table_sha = sha256_file(table)
    check_index_table(folder, name, table, table_sha)
    writable(folder, "the slide features", "set embed.out to a folder you can write")
    settings_file = folder / "settings.json"
    if not settings_file.is_file():
        write_json(settings_file, settings)
    return CohortJob(chunk_of(records, chunk), chunk, slide, run, encoder, settings, folder, name, table_sha,
                     on_bad_image, table)


def check_name(name: str) -> str:
    """embed.name: a file name of the features folder (its index and problems), not a path out of it."""
    if any(sep in name for sep in ("/", "\\", os.sep)) or name in (".", "..") or name.startswith("."):
        raise ConfigError(f"embed.name={name!r}: a cohort's name is a file name in the features folder, not a path. "
                          "Fix: a name without '/' or '..', e.g. embed.name=cohort_a (embed.out sets the folder)")
    return name


def check_accelerator(accelerator: str) -> None:
    """embed.accelerator: a GPU asked for where torch sees none is refused by key, not by Lightning's traceback."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"embed.accelerator={accelerator}: torch sees no GPU on this machine. Fix: "
                          "embed.accelerator=auto (a GPU where there is one, else the CPU) or embed.accelerator=cpu")


def say_renamed_columns(records: list[SlideRecord], table: Path) -> None:
    """A table's column named like one of the index's own is kept as table_<name>: said once."""
    clashing = [k for k in (records[0].extra if records else {}) if k in OWN]
    if clashing:
        log.warning("%s: column%s %s named like the cohort index's own: kept there as %s", table,
                    "s" * (len(clashing) > 1), ", ".join(clashing), ", ".join(f"table_{c}" for c in clashing))


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
