"""Which slides of a cohort each process embeds, and how what they wrote comes together into the cohort's index.

Slides are shared out by `embed.chunk=i/n` (jobs, e.g. a Hydra submitit sweep) and then over the devices of a job
(Lightning Fabric ranks), both by `balanced_bins` of the files' sizes, a deterministic rule every process computes
alike: no slide is embedded by two ranks. Each rank writes its part, rank 0 combines its run's parts into the
chunk's, and the last chunk to finish merges every chunk's part into the index:

    <features folder>/
        <name>.index.csv                    slide, patient, label, tiles, shard, seconds, sha256 + the table's columns
        <name>.problems.csv                 the slides left out (unreadable, no tissue, no MPP) and why
        parts/<name>/                       each chunk's rows, merged into the index once every chunk has written
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.common.files import atomic_path
from histoflow.data.locks import only_writer
from histoflow.data.problems import Problem, write_problems
from histoflow.features.cohort_job import INDEX_COLUMNS, CohortJob
from histoflow.slides.table import SlideRecord

log = logging.getLogger(__name__)


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


def file_size(path: Path) -> int:
    """A slide file's size, the weight it is shared out by (its tissue, roughly)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0  # a missing file weighs nothing; it becomes a problem where its rank plans it


def chunk_of(records: Sequence[SlideRecord], chunk: tuple[int, int]) -> list[tuple[int, SlideRecord]]:
    """(table row index, record) of the table's i-th chunk of n, balanced by file size (a slide's tissue, roughly)."""
    i, n = chunk
    mine = balanced_bins([file_size(r.path) for r in records], n)[i - 1]
    return [(k, records[k]) for k in mine]


def rank_share(records: Sequence[tuple[int, SlideRecord]], rank: int, world: int) -> list[tuple[int, SlideRecord]]:
    """The slides of a chunk that one of its `world` ranks embeds."""
    return [records[k] for k in balanced_bins([file_size(r.path) for _, r in records], world)[rank]]


# ------------------------------------------------------------------------------------------------ parts and index


def parts_folder(job: CohortJob) -> Path:
    return job.folder / "parts" / job.name


def part_name(job: CohortJob, rank: tuple[str, int, int] | None = None) -> str:
    """The chunk's part, or (rank=(run id, rank, world)) one rank's part of it: named by the run too, so two jobs
    running the same chunk at once never read or remove each other's."""
    i, n = job.chunk
    base = f"{job.table_sha[:12]}-chunk-{i:04d}-of-{n:04d}"
    return f"{base}.json" if rank is None else f"{base}.run-{rank[0]}.rank-{rank[1]}-of-{rank[2]}.json"


def write_json(path: Path, value: Any) -> None:
    """`value` as JSON at `path`, whole or not at all (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value))


def combine_ranks(job: CohortJob, run_id: str, world: int) -> dict[str, Any]:
    """The chunk's part from the parts of this run's ranks (rank 0, after the barrier)."""
    names = [part_name(job, (run_id, r, world)) for r in range(world)]
    parts = [json.loads((parts_folder(job) / name).read_text()) for name in names]
    chunk = {"table_sha256": job.table_sha, "chunk": list(job.chunk),
             "rows": sorted((row for p in parts for row in p["rows"]), key=lambda r: r["row"]),
             "problems": sorted((q for p in parts for q in p["problems"]), key=lambda q: q["row"]),
             "embedded": [e for p in parts for e in p["embedded"]], "reused": [e for p in parts for e in p["reused"]],
             "tiles": sum(p["tiles"] for p in parts)}
    write_json(parts_folder(job) / part_name(job), chunk)
    for name in names:
        (parts_folder(job) / name).unlink()
    return chunk


def table_record(folder: Path, name: str) -> Path:
    """<name>.table.json: the slide table (its path and sha256) whose slides <name>.index.csv lists."""
    return folder / f"{name}.table.json"


def check_index_table(folder: Path, name: str, table: Path, table_sha: str) -> None:
    """Refuse a table other than the one the index `name` was written from (another path and other bytes: two
    tables of one file name would share, and replace each other's, index); the same table edited replaces it."""
    record = table_record(folder, name)
    if not record.is_file():
        return
    said = json.loads(record.read_text())
    if said.get("sha256") != table_sha and Path(said.get("table", "")) != table.resolve():
        raise ConfigError(f"{folder / f'{name}.index.csv'}: the cohort index named {name!r} is of another slide "
                          f"table, {said.get('table')} (sha256 {str(said.get('sha256'))[:12]}), not {table} "
                          f"(sha256 {table_sha[:12]}). Fix: embed.name=<a name of its own> (data.features.name with "
                          "data=slides), or delete that index to replace it")


def merge_index(folder: Path, name: str, table_sha: str, chunks: int, table: Path | None = None) -> Path | None:
    """The cohort index and problems table from every chunk's part, once all `chunks` are there (None before: the
    last chunk to finish writes them). Rows in the table's order; each row's shard checked to be there; `table`:
    the slide table, recorded beside the index (<name>.table.json)."""
    with only_writer(folder / "locks" / f"{name}.merge.lock", f"merges the index of {name}"):
        if table is not None:  # another table of this name may have written the index since this run started
            check_index_table(folder, name, table, table_sha)
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
        if table is not None:
            write_json(table_record(folder, name), {"table": str(table.resolve()), "sha256": table_sha})
    log.info("cohort index: %s (%d slides; %d left out, listed in %s.problems.csv)", index, len(rows), len(problems),
             name)
    return index
