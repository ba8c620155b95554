"""Training-loader throughput (patches/s) over the real lymphoma shards, for 0 and 2 loader workers.

    python benchmarks/bench_loader.py [--data DIR] [--out DIR] [--batches N] [--workers 0 2]

--data names the folder holding lymphoma/ (default $HISTOFLOW_DATA, else ../shared/data beside the
repo). The shards are prepared once into --out (default: a folder in the system temp dir, reused by
later runs). Each setting runs one warm-up epoch (worker start, shuffle buffer fill), then times a
second one. Also times the stages of one worker alone: shard reading (histoflow's tar reader and
webdataset's tarfile_to_samples), and the batch transforms. Exits 0 whatever the numbers; 2 without data.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import OmegaConf

from histoflow.data.datamodule import ShardDataModule
from histoflow.data.shards import tar_samples

REPO = Path(__file__).resolve().parents[1]


def data_config(lymphoma: Path, out: Path, loader: dict) -> dict:
    cfg = OmegaConf.load(REPO / "conf" / "data" / "lymphoma.yaml")
    cfg.root, cfg.cache_dir, cfg.shards.dir = str(lymphoma), str(out / "cache"), str(out)
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("_target_")
    data["loader"] = {**(data.get("loader") or {}), **loader}
    return data


def time_epoch(loader) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process, patches."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for x, _ in loader:
        n += len(x)
    return time.perf_counter() - t0, time.process_time() - c0, n


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_rates(dm: ShardDataModule) -> None:
    """Samples/s of the single-process stages, in CPU seconds (other processes on the machine don't count)."""
    urls = dm.split.train[:3]
    for name, reader in (("histoflow tar reader", tar_samples), ("wds.tarfile_to_samples", wds.tarfile_to_samples())):
        t0, n = time.process_time(), sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), reader))
        print(f"  {name:26s} {n / (time.process_time() - t0):10,.0f} samples/s")
    batch = torch.randint(0, 256, (dm.loader.batch_size, dm.prepared.patch_side, dm.prepared.patch_side, 3),
                          dtype=torch.uint8)
    for train in (True, False):
        transform = dm.transform(train=train)
        transform(batch)
        t0 = time.process_time()
        for _ in range(100):
            transform(batch)
        rate = 100 * len(batch) / (time.process_time() - t0)
        print(f"  {'train' if train else 'eval'} transform ({dm.loader.normalize}) {rate:13,.0f} patches/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "histoflow-bench")
    parser.add_argument("--batches", type=int, default=200, help="batches per timed epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    lymphoma = args.data / "lymphoma"
    if not lymphoma.is_dir():
        print(f"{lymphoma}: not found. Fix: pass --data or set HISTOFLOW_DATA to the folder holding lymphoma/")
        return 2
    torch.set_num_threads(1)  # what a loader worker gets; the trainer keeps the other cores
    for workers in args.workers:
        loader = {"num_workers": workers, "epoch_batches": args.batches, "batch_size": args.batch_size}
        dm = ShardDataModule(fold=1, **data_config(lymphoma, args.out, loader))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            dm.prepare_data()
        dm.setup("fit")
        if workers == args.workers[0]:
            print(f"{len(dm.split.train)} training shards, {dm.split.samples['train']:,} patches, "
                  f"{os.cpu_count()} CPUs; single-process stages:")
            stage_rates(dm)
        train, before = dm.train_dataloader(), children_cpu()
        _, _, warm = time_epoch(train)  # warm-up: workers start, shuffle buffers fill
        seconds, cpu, n = time_epoch(train)
        del train
        gc.collect()  # ends the workers, so their CPU time is counted
        line = f"training loader, {workers} worker(s): {n / seconds:10,.0f} patches/s ({n:,} in {seconds:.2f} s"
        if workers:
            # per CPU-second of the workers: what one worker delivers on a core of its own, whatever else runs
            rate = (warm + n) / max(children_cpu() - before, 1e-9)
            line += f"; {rate:,.0f} patches per worker CPU-second, main process {cpu:.2f} CPU-s"
        print(line + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
