"""Frozen features: every patch of a prepared data set through a frozen encoder once, into shards beside it.

    <prepared>/embeddings/<encoder>-<key>/  one shard per patch shard (same name, same samples, same keys and
                                           classes; `.npy` holds the float32 feature vector), embeddings.json last

The key hashes what decides the vectors: the encoder config, the sha256 of its weights file, and the input
preprocessing (crop, resize, normalisation). Another encoder or weights file writes another folder; the same one
is found and reused by every fold, run and sweep. Shards are written atomically (shards.atomic_shard), so a
killed run leaves only complete shards and the next one embeds the rest: no sample twice, none lost.

Every fold shares one embedding, so the input's normalisation must not depend on the fold: a pretrained
encoder's own mean and std (encoder.preprocess), ImageNet's, or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.common.machine import AUTO, resolve_device, resolve_workers
from histoflow.common.progress import progress_bar
from histoflow.data.datamodule import ShardDataModule
from histoflow.data.dataset import PreparedDataset, Split
from histoflow.data.fingerprint import content_hashes
from histoflow.data.loader_config import LoaderConfig
from histoflow.data.locks import only_writer, writable
from histoflow.data.pipeline import as_made
from histoflow.data.shards import add_sample, atomic_shard, stack_npy, tar_samples
from histoflow.data.transforms import PatchTransform, build_transform
from histoflow.models import build_encoder, input_preprocess

log = logging.getLogger(__name__)
T = TypeVar("T")
FORMAT = 1
RECORD = "embeddings.json"
HASHES = ".hashes-weights.json"  # beside the encoders' folders: the weights files' sha256 by file status
FOLD_FREE = ("imagenet", "fixed", "none")  # normalisations that do not read the training fold's statistics
LOADER_KEYS = ("crop", "resize", "interpolation", "normalize", "mean", "std", "scale", "grey")
NOT_DECIDING = ("cache_dir", "freeze_backbone")  # encoder config keys that do not change a vector


def weights_sha256(file: Path, root: Path) -> str:
    """sha256 of an encoder's weights file, remembered in `root` (<prepared>/embeddings) by the file's status:
    a foundation model's file is ~1 GB, read once rather than by every job and every prediction."""
    return content_hashes([file.expanduser().resolve()], root / HASHES)[0]


def encoder_settings(encoder_cfg: Mapping[str, Any], loader: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """What decides the vectors of an encoder on a prepared data set: its config, weights and input preprocessing
    (root: the embeddings folder of the prepared data set, which caches the weights' sha256)."""
    encoder = {k: v for k, v in to_builtin(encoder_cfg).items() if k not in NOT_DECIDING}
    weights = encoder.get("weights")
    digest = None
    if weights is not None and Path(str(weights)).expanduser().is_file():
        digest = weights_sha256(Path(str(weights)), root)
        encoder["weights"] = Path(str(weights)).name  # the content counts, not where the file lies
    elif weights is not None and ("/" in str(weights)
                                  or str(weights).endswith((".pth", ".pt", ".bin", ".safetensors"))):
        raise MissingInputError(f"encoder.weights file '{weights}' does not exist. Fix: point encoder.weights at the "
                                "encoder's weights file (or set HISTOFLOW_WEIGHTS to the folder holding it)")
    return {"format": FORMAT, "encoder": encoder, "weights_sha256": digest,
            "input": {k: loader.get(k) for k in LOADER_KEYS}}


def embeddings_dir(prepared: PreparedDataset, settings: Mapping[str, Any]) -> Path:
    """<prepared>/embeddings/<encoder name>-<12 hex digits of the settings' sha256>."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    encoder = settings["encoder"]
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", str(encoder.get("name") or encoder.get("_target_", "encoder"))).strip("_")
    return prepared.path / "embeddings" / f"{name}-{digest}"


class Embedder:
    """A frozen encoder as the DataModule's `embed`: the features of a prepared data set through the loader's input
    settings (the encoder's own preprocessing, models.input_preprocess), made once, found afterwards."""

    def __init__(self, encoder_cfg: Mapping[str, Any], device: str = "auto") -> None:
        self.encoder, self.device = to_builtin(encoder_cfg), device

    def __call__(self, prepared: PreparedDataset, loader: LoaderConfig) -> "EmbeddedDataset":
        return embed_dataset(prepared, self.encoder, asdict(loader), device=self.device,
                             batch_size=loader.eval_batch_size or loader.batch_size)


def encoder_datamodule(encoder_cfg: Mapping[str, Any], fold: int | str = 1, device: str = "auto",
                       **data: Any) -> ShardDataModule:
    """The DataModule of a `data` config whose samples are a frozen encoder's features: the patches go in as the
    encoder wants them (its `preprocess`), and its embeddings are made once, then found."""
    return ShardDataModule(fold=fold, preprocess=input_preprocess(None, encoder_cfg),
                           embed=Embedder(encoder_cfg, device), **data)


class EmbeddedDataset:
    """Read access to the embeddings of a prepared data set: the same folds and roles, feature vectors as samples."""

    def __init__(self, path: str | Path, prepared: PreparedDataset) -> None:
        self.path, self.prepared = Path(path), prepared
        record = self.path / RECORD
        if not record.is_file():
            raise MissingInputError(f"{record}: no completion record; the embedding was not (fully) done. Fix: run "
                                    "`histoflow embed data=... encoder=...` (it resumes where it stopped)")
        self.record = json.loads(record.read_text())
        self.dim: int = self.record["dim"]

    def split(self, test_fold: str | int) -> Split:
        """The prepared data's split of this fold, with every patch shard replaced by its embedding shard."""
        split = self.prepared.split(test_fold)
        here = lambda urls: [str(self.path / Path(u).name) for u in urls]  # noqa: E731
        return Split(here(split.train), here(split.val), here(split.test), split.samples)


def fold_free_transform(prepared: PreparedDataset, loader: Mapping[str, Any]) -> PatchTransform:
    """The evaluation transform every patch is embedded through, the same for every fold."""
    if loader.get("normalize") not in FOLD_FREE:
        raise ConfigError(f"data.loader.normalize={loader.get('normalize')} reads each fold's training statistics, "
                          "but one embedding serves every fold. Fix: give the encoder its mean and std "
                          "(encoder.preprocess.mean/std; timm encoders take theirs with `auto`), or set "
                          f"data.loader.normalize to one of {', '.join(FOLD_FREE)}")
    # only the patch side of these statistics is read: the normalisation above is fixed
    return build_transform(loader, prepared.stats(prepared.test_folds[0]), train=False)


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """The items of an iterator, each next one made in a background thread while this one is used (its errors
    raised here)."""
    end = object()
    with ThreadPoolExecutor(1) as pool:
        coming = pool.submit(next, items, end)
        while (item := coming.result()) is not end:
            coming = pool.submit(next, items, end)
            yield item


class ShardBatches(IterableDataset):
    """(shard index, keys, classes, uint8 patches, last) of patch shards, batch by batch. Each loader worker reads
    whole shards (every n-th), so a shard's batches arrive in order; `last` marks a shard's final batch (an empty
    shard gives one empty batch, and an empty feature shard)."""

    def __init__(self, shards: Sequence[str | Path], batch_size: int) -> None:
        self.shards, self.batch_size = [str(s) for s in shards], batch_size

    def __iter__(self) -> Iterator[ShardBatch]:
        worker = get_worker_info()
        mine = range(len(self.shards))
        if worker is not None:
            mine = mine[worker.id::worker.num_workers]
        for index in mine:
            yield from self._batches(index)

    def _batches(self, index: int) -> Iterator[ShardBatch]:
        batches = _chunks(tar_samples([{"url": self.shards[index]}]), self.batch_size)
        batch = next(batches, [])
        for following in batches:  # one held back, to know which is last
            yield _decoded(index, batch, last=False)
            batch = following
        yield _decoded(index, batch, last=True)


ShardBatch = tuple[int, list[str], list[int], torch.Tensor, bool]


def _chunks(items: Iterator[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decoded(index: int, batch: list[dict], last: bool) -> ShardBatch:
    patches = torch.from_numpy(stack_npy([s["npy"] for s in batch])) if batch else torch.empty(0, dtype=torch.uint8)
    return index, [s["__key__"] for s in batch], [int(s["cls"]) for s in batch], patches, last


class ShardWriters:
    """The feature shards being written, each under its temporary name until its last batch (shards.atomic_shard):
    as many open at once as loader workers deliver in turn. Leaving the block on an error removes every open one."""

    def __init__(self, destinations: Sequence[Path], done: Callable[[int], None] | None) -> None:
        self.destinations, self.done = destinations, done
        self.open: dict[int, tuple[ExitStack, Any]] = {}
        self.count = 0

    def write(self, index: int, keys: list[str], classes: list[int], vectors: torch.Tensor,
              ready: torch.cuda.Event | None, last: bool) -> None:
        if index not in self.open:
            stack = ExitStack()
            self.open[index] = stack, stack.enter_context(atomic_shard(self.destinations[index]))
        stack, tar = self.open[index]
        if ready is not None:
            ready.synchronize()  # the copy off the device has landed
        for key, cls, vector in zip(keys, classes, vectors.numpy()):
            add_sample(tar, key, cls, np.ascontiguousarray(vector))
        self.count += len(keys)
        if last:
            del self.open[index]
            stack.close()  # renamed to its name: complete
        if self.done is not None:
            self.done(len(keys))

    def __enter__(self) -> "ShardWriters":
        return self

    def __exit__(self, *error: Any) -> None:
        unfinished = None
        if error[0] is None and self.open:  # never, unless a reader lost a shard's end: no shard may look complete
            unfinished = RuntimeError(f"shards {sorted(self.open)} ended without their last batch")
            error = (RuntimeError, unfinished, None)
        for stack, _ in self.open.values():
            stack.__exit__(*error)  # its temporary file removed
        if unfinished is not None:
            raise unfinished


@torch.inference_mode()
def embed_shards(shards: Sequence[tuple[Path, Path]], encoder: torch.nn.Module, transform: PatchTransform,
                 batch_size: int, device: torch.device, workers: int = 0,
                 done: Callable[[int], None] | None = None) -> int:
    """Embed shards of patches, each (source, destination) into a shard of feature vectors with the same keys and
    classes; the sample count. done: called with each batch's size (a progress bar).

    Four things overlap: `workers` loader processes read and decode shards (pinned for the copy to a GPU; with
    none, a thread reads the next batch), the device embeds this batch (its copy there asynchronous), and this
    thread writes the previous batch's vectors while it waits. Done one after another, they made the embedding
    0.22 of the encoder's forward rate on an H200 (benchmarks/gpu_check.py).
    """
    gpu = device.type == "cuda"
    workers = min(workers, len(shards))
    loader = DataLoader(ShardBatches([src for src, _ in shards], batch_size), batch_size=None, collate_fn=as_made,
                        num_workers=workers, pin_memory=gpu, prefetch_factor=2 if workers else None)
    with ShardWriters([dst for _, dst in shards], done) as writers:
        pending = None
        for index, keys, classes, patches, last in prefetched(iter(loader)):
            vectors, ready = patches.new_empty(0), None
            if keys:
                features = encoder(transform(patches.to(device, non_blocking=gpu))).float()
                vectors = features.to("cpu", non_blocking=gpu)
                ready = torch.cuda.Event() if gpu else None
                if ready is not None:
                    ready.record()
            if pending is not None:
                writers.write(*pending)
            pending = index, keys, classes, vectors, ready, last
        if pending is not None:
            writers.write(*pending)
    return writers.count


def embed_dataset(prepared: PreparedDataset, encoder_cfg: Mapping[str, Any], loader: Mapping[str, Any],
                  batch_size: int = 256, device: str = "auto", progress: bool = True) -> EmbeddedDataset:
    """The embeddings of a prepared data set by a frozen encoder: found when done, else made (or finished).

    The patches are read by the loader's `num_workers` processes (auto: none on a CPU, the CPUs less one beside a
    GPU). One process at a time writes a folder; the others wait for its lock and then find it done.
    """
    loader = dict(loader)
    settings = encoder_settings(encoder_cfg, loader, prepared.path / "embeddings")
    out = embeddings_dir(prepared, settings)
    if (out / RECORD).is_file():
        return EmbeddedDataset(out, prepared)
    transform = fold_free_transform(prepared, loader)
    # built (its weights read) before its folder is made: a damaged weights file leaves no empty folder behind
    encoder, dim = build_encoder(encoder_cfg, transform.out_side)
    writable(out, "the embeddings", "they go beside the prepared data: make that folder writable, or prepare the "
             "data where it can be written (data.shards.dir or paths.data_dir)")
    with only_writer(out / ".embed.lock", f"embeds into {out}"):
        if (out / RECORD).is_file():  # another process finished it while this one waited
            return EmbeddedDataset(out, prepared)
        return _embed(prepared, (encoder, dim), settings, transform, out, batch_size, device, progress,
                      loader.get("num_workers", AUTO))


def _embed(prepared: PreparedDataset, built: tuple[torch.nn.Module, int], settings: Mapping[str, Any],
           transform: PatchTransform, out: Path, batch_size: int, device: str, progress: bool,
           workers: int | str) -> EmbeddedDataset:
    for leftover in out.glob(".*.tmp"):  # half-written by a killed run
        leftover.unlink()
    dev = resolve_device(device)
    encoder, dim = built
    encoder = encoder.to(dev)
    shards = prepared.record["shards"]
    todo = [s for s in shards if not (out / s["file"]).is_file()]
    if len(todo) < len(shards):
        log.info("resuming: %d of %d embedding shards already written in %s", len(shards) - len(todo), len(shards), out)
    t0, done = time.perf_counter(), 0
    with progress_bar(progress) as bar:
        task = bar.add_task(f"embedding ({settings['encoder'].get('name', 'encoder')}, {dev.type})",
                            total=sum(s["samples"] for s in todo), rate="")

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):.0f} patches/s")

        embed_shards([(prepared.path / "shards" / s["file"], out / s["file"]) for s in todo], encoder, transform,
                     batch_size, dev, resolve_workers(workers, "data.loader.num_workers", dev.type), advance)
    record = {**settings, "dim": dim, "prepared": str(prepared.path), "samples": prepared.record["samples"],
              "shards": [s["file"] for s in shards], "seconds": round(time.perf_counter() - t0, 2),
              "device": str(dev)}
    tmp = out / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / RECORD)
    log.info("embedded %d patches (%d features each) in %.1f s into %s", record["samples"], dim, record["seconds"], out)
    return EmbeddedDataset(out, prepared)

