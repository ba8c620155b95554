"""Training throughput (patches/s) on the real lymphoma shards, with the janowczyk_lymphoma recipe.

    python benchmarks/bench_train.py [--data DIR] [--out DIR] [--batches N] [--workers W] [--batch-size B]
                                     [--device auto|cpu|cuda] [--precision 32-true|bf16-mixed] [--no-png]
                                     [--device-prefetch auto|true|false] [--json FILE] [--check]

Prints (a) the training loader alone, streaming shards; (b) the net's pure training step (forward,
cross-entropy, backward, Adagrad step) on real batches held in memory; (c) end-to-end training with
Lightning (PatchClassifier, its metrics, CSV logging and progress bar, the loader of (a)); (d) for
comparison, a loader reading the same patches as one PNG file each, as the tutorial's Caffe image-data
layer does, with the same batch transform. The loaders run with 0 workers and with --workers (default:
the data config's), and each is compared at its best. Floors: (c) >= 0.85 (b), so loading and
bookkeeping cost little on top of the maths; (a) >= 5 (d). On a GPU (--device, default auto) the step and
the end-to-end run use the device with --precision (bf16-mixed: autocast) and channels_last weights, as
trainer=gpu does, and each timed step waits for the device (in (c) for the step's stream: the next batch's copy
runs beside it on a side stream, data.loader.device_prefetch, auto: on a GPU; --device-prefetch false for the
serial copy); --batch-size sets the batch (default the recipe's).

On a machine shared with other work, timings only ever get slower: loaders report their best of 3
passes after a warm-up pass, training its fastest 10 consecutive steps (waits for data included).
--data names the folder holding lymphoma/ (default $HISTOFLOW_DATA, else ../shared/data); shards and
PNGs are written once into --out and reused. Exits 0 whatever the numbers unless --check is given
(then 1 when a floor is missed); 2 without data.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytorch_lightning as pl
import torch
from common import add_common_args, describe, device_of, sync, write_figures
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from histoflow.common.machine import cpu_count, resolve_workers
from histoflow.data.datamodule import ShardDataModule
from histoflow.models.build import build_net
from histoflow.training.callbacks import ChannelsLast
from histoflow.training.module import PatchClassifier

REPO = Path(__file__).resolve().parents[1]
FLOOR_END_TO_END = 0.85  # (c) / (b)
FLOOR_SHARDS_VS_PNG = 5.0  # (a) / (d)


def recipe(lymphoma: Path, out: Path, batches: int, workers: int, batch_size: int | None = None,
           device_prefetch: str | None = None) -> Any:
    """train.yaml with experiment=janowczyk_lymphoma, reading lymphoma and writing under out."""
    overrides = ["experiment=janowczyk_lymphoma", f"data.root={lymphoma}", f"paths.data_dir={out}",
                 f"paths.cache_dir={out / 'cache'}", f"data.loader.num_workers={workers}",
                 f"data.loader.epoch_batches={batches}"]
    if batch_size:
        overrides.append(f"data.loader.batch_size={batch_size}")
    if device_prefetch:
        overrides.append(f"data.loader.device_prefetch={device_prefetch}")
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir = str(out / "run")  # ${hydra:...} is unset outside a Hydra run
    return cfg


def pass_rate(batches: Iterable) -> tuple[float, int]:
    """Patches/s and patch count of one pass over (x, y) batches."""
    t0, n = time.perf_counter(), 0
    for _, y in batches:
        n += len(y)
    return n / (time.perf_counter() - t0), n


def loader_rate(loader: Iterable, passes: int) -> tuple[float, int]:
    """Best of `passes` epochs of a loader after a warm-up one (workers started, files cached): other load on
    a shared machine only ever slows a pass down, so the fastest is the closest to the loader's own speed."""
    pass_rate(loader)
    return max(pass_rate(loader) for _ in range(passes))


def step_rate(seconds: list[float], batch: int, window: int = 10) -> float:
    """Patches/s of the fastest run of `window` consecutive steps: as with the loaders' best pass, other
    processes on a shared machine only slow steps down; a window keeps any waits for data in the count."""
    sums = np.convolve(np.asarray(seconds), np.ones(window), mode="valid")
    return window * batch / float(sums.min())


def train_step_rate(cfg: Any, dm: ShardDataModule, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device, precision: str) -> float:
    """(b) forward + loss + backward + optimizer step on real batches held in memory (on the device), patches/s.
    On a GPU: channels_last weights, autocast for bf16-mixed, and a wait for the device after every step (as
    Lightning's logging of the step's loss does), so each step's time is its own."""
    net = build_net(cfg.model, dm.num_classes, dm.input_size).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    seconds = []
    for x, y in [*batches[:5], *batches]:  # the first five warm up (oneDNN/cuDNN pick their kernels)
        t0 = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return step_rate(seconds[5:], len(batches[0][1]))


def sync_step(device: torch.device) -> None:
    """Wait for the step's stream only. A wait for the whole device would also wait for the next batch's copy, which
    data.loader.device_prefetch queues on a side stream, and so take away the overlap (c) is meant to measure."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class StepTimer(pl.Callback):
    """Wall time of every training step of the last epoch, from one batch's end to the next (so data
    loading, transfer, logging and metrics are all in it), and of the whole epoch; split into the time from a
    batch's end to the next one's start (fetching from the loader, transfer, the batch transform) and from its
    start to its end (the step, metrics, logging, the progress bar)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: list[float] = []
        self.data: list[float] = []
        self.n = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        sync_step(pl_module.device)
        self.begun = time.perf_counter()
        self.data.append(self.begun - self.last)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sync_step(pl_module.device)
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last, self.n = now, self.n + len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_rate = self.n / (time.perf_counter() - self.start)


def end_to_end_rate(cfg: Any, dm: ShardDataModule, out: Path, device: torch.device,
                    precision: str) -> tuple[float, float, float, float]:
    """(c) Lightning fit over the shards with the real module, metrics, CSV logger and progress bar; on a GPU as
    trainer=gpu runs it (the precision given, channels_last, cuDNN benchmark).

    Returns the best-window rate of the second epoch, that epoch's overall rate (with its start-up), and the median
    milliseconds of a step's data part (fetch, transfer, transform) and of the rest (StepTimer).
    """
    net = build_net(cfg.model, dm.num_classes, dm.input_size)
    module = PatchClassifier(net, optimizer=instantiate(cfg.optimizer), classes=list(dm.classes),
                             input_size=dm.input_size)
    timer = StepTimer()
    gpu = device.type == "cuda"
    trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=[device.index or 0] if gpu else 1,
                         precision=precision, benchmark=gpu or None, max_epochs=2, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=CSVLogger(out / "run"), enable_checkpointing=False,
                         enable_model_summary=False, log_every_n_steps=50,
                         callbacks=[instantiate(cfg.callbacks.progress_bar), timer, *([ChannelsLast()] if gpu else [])])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(module, datamodule=dm)
    data_ms, all_ms = 1000 * float(np.median(timer.data[1:])), 1000 * float(np.median(timer.seconds[1:]))
    return step_rate(timer.seconds[1:], dm.loader.batch_size), timer.epoch_rate, data_ms, all_ms - data_ms


def transform_rate(dm: ShardDataModule, batches: list[torch.Tensor], device: torch.device) -> float:
    """Patches/s of the training transform alone (crop, flips, normalisation) on uint8 batches on the device."""
    transform = dm.transform(train=True)
    transform(batches[0])
    sync(device)
    t0 = time.perf_counter()
    for x in batches:
        transform(x)
    sync(device)
    return sum(len(x) for x in batches) / (time.perf_counter() - t0)


class PatchFiles(Dataset):
    """One PNG file per patch, label from the class folder: the tutorial's image-layer input."""

    def __init__(self, root: Path, classes: list[str]) -> None:
        self.items = [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).glob("*.png"))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.items[i]
        return np.asarray(Image.open(path).convert("RGB")), label


def collate_patches(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack decoded patches as uint8 like the shard loader, so only the reading differs (both loaders ship
    raw patches; the crop and normalisation run after transfer in training)."""
    return torch.from_numpy(np.stack([s[0] for s in samples])), torch.tensor([s[1] for s in samples])


def write_pngs(dm: ShardDataModule, root: Path, count: int) -> None:
    """The first `count` training patches of the shard loader (no crop yet) as PNG files, once."""
    done = root / ".complete"
    if done.is_file() and int(done.read_text()) >= count:
        return
    from histoflow.data.pipeline import shard_pipeline

    raw = shard_pipeline(dm.split.train, lambda x: x, dm.loader.batch_size, train=False)
    n = 0
    for patches, labels in raw:
        for patch, label in zip(patches.numpy(), labels.tolist()):
            folder = root / dm.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(patch).save(folder / f"{n:07d}.png")
            n += 1
            if n >= count:
                done.write_text(str(n))
                return
    done.write_text(str(n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "histoflow-bench")
    parser.add_argument("--batches", type=int, default=100, help="batches per timed pass")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: the recipe's data.loader.num_workers, auto resolved here)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: the recipe's, 128)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--device-prefetch", default=None, choices=["auto", "true", "false"],
                        help="(c): data.loader.device_prefetch (default: the recipe's, auto: on a CUDA device)")
    parser.add_argument("--no-png", action="store_true", help="skip the one-PNG-per-patch loader (d)")
    parser.add_argument("--passes", type=int, default=3, help="timed loader passes (after a warm-up one)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a floor is missed")
    add_common_args(parser)
    args = parser.parse_args()
    lymphoma = args.data / "lymphoma"
    if not lymphoma.is_dir():
        print(f"{lymphoma}: not found. Fix: pass --data or set HISTOFLOW_DATA to the folder holding lymphoma/")
        return 2
    device = device_of(args.device)
    setting = args.workers if args.workers is not None else OmegaConf.load(
        REPO / "conf" / "data" / "lymphoma.yaml").loader.num_workers
    workers = resolve_workers(setting, "data.loader.num_workers", device.type)
    print(f"device: {describe(device)}, precision {args.precision}; loader workers: {setting} -> {workers} "
          f"({cpu_count()} CPUs)")
    cfg = recipe(lymphoma, args.out, args.batches, workers, args.batch_size, args.device_prefetch)
    dm: ShardDataModule = instantiate(cfg.data, fold=cfg.fold)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dm.prepare_data()
        dm.setup("fit")
    batch = dm.loader.batch_size
    print(f"lymphoma fold {cfg.fold}: {dm.split.samples['train']:,} training patches; batch {batch}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    shards = png = 0.0
    for n_workers in sorted({0, workers}):  # each loader at its best worker count, on the same footing
        dm.loader.num_workers = n_workers
        rate_a, n = loader_rate(dm.train_dataloader(), args.passes)
        print(f"(a) loader only, shards, {n_workers} worker(s):            {rate_a:9,.0f} patches/s "
              f"(best of {args.passes} passes of {n:,})")
        shards = max(shards, rate_a)
        if args.no_png:
            continue
        png_root = args.out / "png-patches"
        write_pngs(dm, png_root, args.batches * batch)
        files = PatchFiles(png_root, list(dm.classes))
        rate_d, n = loader_rate(DataLoader(files, batch_size=batch, shuffle=True, num_workers=n_workers,
                                           collate_fn=collate_patches, drop_last=True,
                                           persistent_workers=n_workers > 0), args.passes)
        print(f"(d) loader only, one PNG per patch, {n_workers} worker(s): {rate_d:9,.0f} patches/s "
              f"(best of {args.passes} passes of {n:,})")
        png = max(png, rate_d)
    dm.loader.num_workers = workers

    raw = [(x.to(device), y.to(device)) for x, y in dm.train_dataloader()]
    transform = transform_rate(dm, [x for x, _ in raw], device)
    train_transform = dm.transform(train=True)
    in_memory = [(train_transform(x), y) for x, y in raw]
    del raw
    step = train_step_rate(cfg, dm, in_memory, device, args.precision)
    del in_memory
    print(f"(b) training step, in memory:       {step:9,.0f} patches/s (best 10 steps)")
    print(f"    the training transform alone:   {transform:9,.0f} patches/s (crop, flips, normalisation)")
    e2e, e2e_epoch, data_ms, rest_ms = end_to_end_rate(cfg, dm, args.out, device, args.precision)
    prefetch = "on" if dm.loader.prefetches(device.type) else "off"  # the next batch copied during the step
    print(f"(c) end-to-end training, shards:    {e2e:9,.0f} patches/s (best 10 steps; {e2e_epoch:,.0f} over "
          f"the whole epoch with its start-up), {workers} worker(s), device_prefetch {prefetch}; a step's median: "
          f"{data_ms:.1f} ms fetch, transfer and transform, {rest_ms:.1f} ms step, metrics, logging and progress bar")

    floors = [(f"(c)/(b) = {e2e / step:.2f}", e2e / step, FLOOR_END_TO_END)]
    if png:
        floors.append((f"best (a)/best (d) = {shards / png:.1f}", shards / png, FLOOR_SHARDS_VS_PNG))
    missed = False
    for text, value, floor in floors:
        ok = value >= floor
        missed |= not ok
        print(f"{text:24s} floor {floor:g}: {'ok' if ok else 'MISSED'}")
    write_figures(args.json, {"device": describe(device), "precision": args.precision, "batch_size": batch,
                              "workers": workers, "device_prefetch": prefetch, "loader_patches_per_s": shards,
                              "step_patches_per_s": step,
                              "end_to_end_patches_per_s": e2e, "end_to_end_epoch_patches_per_s": e2e_epoch,
                              "end_to_end_over_step": e2e / step, "transform_patches_per_s": transform,
                              "step_data_ms": data_ms, "step_rest_ms": rest_ms,
                              "png_loader_patches_per_s": png or None})
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
