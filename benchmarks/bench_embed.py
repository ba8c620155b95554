"""Frozen features: embedding throughput against the encoder's pure forward rate, and a five-fold head sweep.

    python benchmarks/bench_embed.py [--data DIR] [--out DIR] [--patches N] [--experiment NAME] [--no-sweep]
                                     [--device auto|cpu|cuda] [--json FILE] [--check] [OVERRIDE ...]

On the real lymphoma patches with experiment=lymphoma_frozen_squeezenet (ImageNet SqueezeNet 1.1 features of
../shared/weights, 128-px windows at 224 px, a linear head), prints
(a) the encoder's pure forward rate (patches/s) on N prepared patches, transformed and held in memory;
(b) the embedding of the same N patches, written as up to --shards shards (default 8) of whole batches, as
    histoflow.features.embeddings embeds prepared shards (read and decoded by the data config's loader workers,
    transform, forward, write atomically), patches/s; floor (b) >= 0.8 (a): reading and writing cost little
    beside the encoder;
(c) the wall time of `python train.py -m experiment=... fold=1,2,3,4,5` on the cached embeddings (every job's
    head, checkpoints, CSV logs and the fold summary; the k-fold image report, which runs encoder + head on every
    image again, timed apart as (d)); floor (c) < 120 s on the project's 2-core CPU.

On a machine shared with other work timings only get slower: (a) and (b) alternate, best of 3 each. --device
(default auto: the GPU when there is one) runs the encoder in (a) and (b) there; --no-sweep skips (c) and (d);
OVERRIDEs are Hydra overrides of the experiment (e.g. encoder.weights=FILE where ../shared/weights is not beside).
--data names the folder holding lymphoma/ (default $HISTOFLOW_DATA, else ../shared/data); --out keeps the
prepared data and embeddings (default: a temporary folder). Exits 0 whatever the numbers unless --check is given
(then 1 when a floor is missed); 2 without data or weights.

    python benchmarks/bench_embed.py --cohort [--slides-per-source N] [--side PX] [--tile-size PX] [--mpp M]
                                     [--workers N|auto] [--device ...] [--json FILE] [--check]

--cohort times a cohort of slides instead (histoflow.features.cohort, `histoflow embed slides=<table.csv>`): a
cohort of pyramidal TIFFs cut from the real slides of <data>/wsi (testing/cohort_fixture.py; CMU-1 and the TCGA
slide, whose regions are mostly tissue), its tissue tiles at --mpp and --tile-size into ImageNet SqueezeNet 1.1 at
that side, and prints
(e) the encoder's pure forward rate (tiles/s) on every tissue tile of the cohort, read, normalised and held in
    memory beforehand;
(f) the cohort embedded as a user runs it into a fresh folder (hash, tissue mask, tile grid, decode in
    --workers loader processes, forward, one shard per slide, index), tiles/s over the slide loop, and the share
    of that wall time the encoder waited for tiles; floor (f) >= 0.8 (e). Best of 3 each, alternating.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import torch
from common import add_common_args, describe, device_of, sync, write_figures
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from histoflow.common.machine import cpu_count, resolve_workers
from histoflow.data.prepare import prepare_dataset
from histoflow.data.shards import (
    add_sample,
    atomic_shard,
    decode_npy,
    stack_npy,
    tar_samples,
)
from histoflow.features.cohort import embed_cohort
from histoflow.features.cohort_job import encoder_input
from histoflow.features.embeddings import (
    embed_shards,
    encoder_datamodule,
    fold_free_transform,
)
from histoflow.models import build_encoder
from histoflow.slides.backend import open_slide
from histoflow.slides.table import read_slide_table
from histoflow.slides.tiles import NoTissueError, SlideTiles, TileGeometry, tissue_tiles
from histoflow.testing.cohort_fixture import build_cohort

REPO = Path(__file__).resolve().parents[1]
FLOOR_EMBED_VS_FORWARD = 0.8  # (b) / (a)
FLOOR_SWEEP_S = 120.0  # (c)


def experiment(name: str, lymphoma: Path, out: Path, extra: list[str]) -> OmegaConf:
    overrides = [f"experiment={name}", f"data.root={lymphoma}", f"paths.data_dir={out}", *extra]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--patches", type=int, default=1024, help="prepared patches timed in (a) and (b)")
    parser.add_argument("--shards", type=int, default=8, help="shards the patches of (b) are written into")
    parser.add_argument("--experiment", default="lymphoma_frozen_squeezenet")
    parser.add_argument("--no-sweep", action="store_true", help="skip (c) and (d)")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--cohort", action="store_true", help="time a cohort of slides instead: (e) and (f)")
    parser.add_argument("--slides-per-source", type=int, default=6)
    parser.add_argument("--side", type=int, default=2048, help="cohort slides' side, pixels")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--workers", default="auto", help="slide.num_workers for (f)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment")
    add_common_args(parser)
    args = parser.parse_args()
    if args.cohort:
        return cohort_main(args)
    device = device_of(args.device)
    lymphoma = args.data / "lymphoma"
    if not lymphoma.is_dir():
        print(f"no lymphoma data at {lymphoma}: set --data or HISTOFLOW_DATA", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    cfg = experiment(args.experiment, lymphoma, out, args.overrides)
    if cfg.encoder.get("weights") and not Path(cfg.encoder.weights).is_file():
        print(f"no encoder weights at {cfg.encoder.weights} (see ../shared/weights/README.md)", file=sys.stderr)
        return 2
    datamodule = encoder_datamodule(cfg.encoder, **OmegaConf.to_container(cfg.data, resolve=True))
    prepared = prepare_dataset(datamodule.data, quiet=True)
    loader = asdict(datamodule.loader)
    transform = fold_free_transform(prepared, loader)
    encoder, dim = build_encoder(cfg.encoder, transform.out_side)
    encoder = encoder.to(device)
    batch = loader["eval_batch_size"] or loader["batch_size"]
    scratch = Path(tempfile.mkdtemp(prefix="bench-embed-shards-"))
    urls = [{"url": str(prepared.path / "shards" / shard["file"])} for shard in prepared.record["shards"]]
    samples = list(islice(tar_samples(urls), args.patches))
    # whole batches in every shard, as in (a): a shard's last batch is short, and short batches time otherwise
    n = len(samples)
    per_shard = batch * math.ceil(n / batch / args.shards)
    sources = [scratch / f"patches-{i:02d}.tar" for i in range(math.ceil(n / per_shard))]
    for i, source in enumerate(sources):  # as prepare writes them: several shards, which loader workers share
        with atomic_shard(source) as tar:
            for sample in samples[i * per_shard:(i + 1) * per_shard]:
                add_sample(tar, sample["__key__"], int(sample["cls"]), decode_npy(sample["npy"]))
    workers = resolve_workers(loader["num_workers"], "data.loader.num_workers", device.type)
    patches = torch.from_numpy(stack_npy([s["npy"] for s in samples]))
    inputs = [transform(patches[i:i + batch].to(device)) for i in range(0, n, batch)]
    torch.set_grad_enabled(False)

    def forward() -> None:
        for x in inputs:
            encoder(x).float().cpu()  # as embed_shards takes the features off the device
        sync(device)

    def embed() -> None:
        embed_shards([(src, scratch / f"features-{src.name}") for src in sources], encoder, transform, batch, device,
                     workers)

    forward()  # warm-up
    t_forward, t_embed = float("inf"), float("inf")
    for _ in range(3):
        t_forward, t_embed = min(t_forward, _timed(forward)), min(t_embed, _timed(embed))
    print(f"machine: {cpu_count()} CPUs, timed on {describe(device)}")
    print(f"encoder {cfg.encoder.name}: {transform.out_side}-px inputs, {dim} features; {n} patches in "
          f"{len(sources)} shards, batches of {batch}, {workers} loader workers")
    print(f"(a) encoder forward alone:  {n / t_forward:8.0f} patches/s")
    print(f"(b) embedding (read, transform, forward, write): {n / t_embed:8.0f} patches/s  "
          f"(b)/(a) = {t_forward / t_embed:.2f} (floor {FLOOR_EMBED_VS_FORWARD})")

    figures = {"device": describe(device), "encoder": cfg.encoder.name, "input_px": transform.out_side,
               "features": dim, "patches": n, "shards": len(sources), "workers": workers, "batch_size": batch,
               "forward_patches_per_s": n / t_forward,
               "embed_patches_per_s": n / t_embed, "embed_over_forward": t_forward / t_embed}
    write_figures(args.json, figures)
    if args.no_sweep:
        return 1 if args.check and t_forward / t_embed < FLOOR_EMBED_VS_FORWARD else 0

    # (c) the five-fold head sweep on cached embeddings, as a user runs it
    t0 = time.perf_counter()
    datamodule.embeddings(prepared)  # embed everything once (not timed in (c))
    print(f"    embedding all {prepared.record['samples']} patches: {time.perf_counter() - t0:.0f} s (cached after)")
    sweep = out / "sweep"
    command = [sys.executable, str(REPO / "train.py"), "-m", f"experiment={args.experiment}", "fold=1,2,3,4,5",
               f"data.root={lymphoma}", f"paths.data_dir={out}", f"hydra.sweep.dir={sweep}", "logger=csv",
               "~hydra.callbacks.image_report"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, env=env, capture_output=True)
    t_sweep = time.perf_counter() - t0
    print(f"(c) five-fold head sweep on the cached embeddings: {t_sweep:.0f} s (floor < {FLOOR_SWEEP_S:.0f} s)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "predict.py"), f"ckpt_path={sweep}", "progress=false",
                    f"hydra.run.dir={out / 'report'}"], check=True, cwd=REPO, env=env, capture_output=True)
    print(f"(d) its k-fold image report (encoder + head on all {len(prepared.manifest())} images): "
          f"{time.perf_counter() - t0:.0f} s")
    write_figures(args.json, {**figures, "sweep_s": t_sweep, "report_s": time.perf_counter() - t0})
    missed = t_forward / t_embed < FLOOR_EMBED_VS_FORWARD or t_sweep >= FLOOR_SWEEP_S
    return 1 if args.check and missed else 0


def cohort_main(args: argparse.Namespace) -> int:
    """(e) and (f): a cohort of slides, the encoder's forward on its tiles in memory against the embedding."""
    wsi, weights = args.data / "wsi", REPO.parent / "shared" / "weights" / "squeezenet1_1-imagenet-features.pth"
    weights = Path(os.environ.get("HISTOFLOW_WEIGHTS", weights.parent)) / weights.name
    if not wsi.is_dir() or not weights.is_file():
        print(f"no slides at {wsi} or no weights at {weights}: set --data (HISTOFLOW_DATA) or HISTOFLOW_WEIGHTS",
              file=sys.stderr)
        return 2
    device = device_of(args.device)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    table = build_cohort(wsi, work / "cohort", per_source=args.slides_per_source, side=args.side,
                         sources=("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"))
    encoder_cfg = {"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1", "weights": str(weights),
                   "preprocess": {"input_size": args.tile_size, "interpolation": "bilinear",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
    workers = args.workers if args.workers == "auto" else int(args.workers)
    slide_cfg = {"tile_size": args.tile_size, "mpp": args.mpp, "backend": "tifffile", "progress": False,
                 "num_workers": workers, "batch_size": 64}
    accelerator = "gpu" if device.type == "cuda" else "cpu"

    # (e) every tissue tile of the cohort, read and normalised beforehand, in memory
    side, transform, _ = encoder_input(encoder_cfg, args.tile_size)
    inputs, n = [], 0
    for record in read_slide_table(table):
        with open_slide(record.path, "tifffile") as slide:
            geometry = TileGeometry.of(slide, args.tile_size, mpp=args.mpp, out_size=side)
            try:
                origins = tissue_tiles(slide, geometry, 0.5, None, slide.thumbnail(1024))
            except NoTissueError:
                continue
        tiles = SlideTiles(record.path, origins, geometry, 64, transform, "tifffile")
        inputs += [tiles[i][1].to(device) for i in range(len(tiles))]
        n += len(origins)
    encoder, dim = build_encoder(encoder_cfg, side)
    encoder = encoder.to(device)
    torch.set_grad_enabled(False)

    def forward() -> None:
        for x in inputs:
            encoder(x).float().cpu()
        sync(device)

    results = []

    def embed() -> None:
        folder = work / f"features-{len(results)}"  # a fresh folder: every slide embedded, none found done
        results.append(embed_cohort(table, encoder_cfg, slide_cfg, {"out": str(folder), "accelerator": accelerator},
                                    "skip"))

    forward()  # warm-up
    t_forward, t_embed = float("inf"), float("inf")
    for _ in range(3):
        t_forward = min(t_forward, _timed(forward))
        t_embed = min(t_embed, _timed(embed))
    best = min(results, key=lambda r: r.seconds)
    assert best.tiles == n, f"the embedding made {best.tiles} tiles, the forward pass had {n}"
    slides = len(best.embedded)
    rate_forward, rate_embed = n / t_forward, best.tiles_per_s
    print(f"machine: {cpu_count()} CPUs, timed on {describe(device)}")
    print(f"cohort: {slides} slides of about {args.side} px cut from CMU-1 and TCGA ({table}), {n} tissue tiles of "
          f"{args.tile_size} px at {args.mpp} microns per pixel; SqueezeNet 1.1 at {side} px ({dim} features), "
          f"batches of 64, slide.num_workers={workers}")
    print(f"(e) encoder forward alone on the tiles in memory: {rate_forward:8.1f} tiles/s")
    print(f"(f) cohort embedding (hash, mask, decode, forward, shards): {rate_embed:8.1f} tiles/s  (f)/(e) = "
          f"{rate_embed / rate_forward:.2f} (floor {FLOOR_EMBED_VS_FORWARD}); the encoder waited for tiles "
          f"{100 * best.wait_share:.1f}% of the slide loop's {best.seconds:.1f} s (whole call {t_embed:.1f} s)")
    write_figures(args.json, {"device": describe(device), "slides": slides, "tiles": n, "tile_size": args.tile_size,
                              "mpp": args.mpp, "input_px": side, "workers": workers,
                              "forward_tiles_per_s": rate_forward, "embed_tiles_per_s": rate_embed,
                              "embed_over_forward": rate_embed / rate_forward, "wait_share": best.wait_share,
                              "loop_s": best.seconds, "call_s": t_embed})
    return 1 if args.check and rate_embed / rate_forward < FLOOR_EMBED_VS_FORWARD else 0


if __name__ == "__main__":
    sys.exit(main())
