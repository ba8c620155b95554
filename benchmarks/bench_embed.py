"""Frozen features: embedding throughput against the encoder's pure forward rate, and a five-fold head sweep.

    python benchmarks/bench_embed.py [--data DIR] [--out DIR] [--patches N] [--experiment NAME] [--no-sweep]
                                     [--device auto|cpu|cuda] [--json FILE] [--check] [OVERRIDE ...]

On the real lymphoma patches with experiment=lymphoma_frozen_squeezenet (ImageNet SqueezeNet 1.1 features of
../shared/weights, 32-px crops upsampled to 64 px, a linear head), prints
(a) the encoder's pure forward rate (patches/s) on N prepared patches, transformed and held in memory;
(b) the embedding of the same N patches, written as one shard, as histoflow.features.embeddings embeds a shard
    (read, decode, transform, forward, write atomically), patches/s; floor (b) >= 0.8 (a): reading and
    writing cost little beside the encoder;
(c) the wall time of `python train.py -m experiment=... fold=1,2,3,4,5` on the cached embeddings (every job's
    head, checkpoints, CSV logs and the fold summary; the k-fold image report, which runs encoder + head on every
    image again, timed apart as (d)); floor (c) < 120 s on the project's 2-core CPU.

On a machine shared with other work timings only get slower: (a) and (b) alternate, best of 3 each. --device
(default auto: the GPU when there is one) runs the encoder in (a) and (b) there; --no-sweep skips (c) and (d);
OVERRIDEs are Hydra overrides of the experiment (e.g. encoder.weights=FILE where ../shared/weights is not beside).
--data names the folder holding lymphoma/ (default $HISTOFLOW_DATA, else ../shared/data); --out keeps the
prepared data and embeddings (default: a temporary folder). Exits 0 whatever the numbers unless --check is given
(then 1 when a floor is missed); 2 without data or weights.
"""

from __future__ import annotations

import argparse
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

from histoflow.common.machine import cpu_count
from histoflow.data.prepare import prepare_dataset
from histoflow.data.shards import (
    add_sample,
    atomic_shard,
    decode_npy,
    stack_npy,
    tar_samples,
)
from histoflow.features.embeddings import (
    embed_shard,
    encoder_datamodule,
    fold_free_transform,
)
from histoflow.models import build_encoder

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
    parser.add_argument("--experiment", default="lymphoma_frozen_squeezenet")
    parser.add_argument("--no-sweep", action="store_true", help="skip (c) and (d)")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment")
    add_common_args(parser)
    args = parser.parse_args()
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
    source = scratch / "patches.tar"
    with atomic_shard(source) as tar:
        for sample in samples:
            add_sample(tar, sample["__key__"], int(sample["cls"]), decode_npy(sample["npy"]))
    n = len(samples)
    patches = torch.from_numpy(stack_npy([s["npy"] for s in samples]))
    inputs = [transform(patches[i:i + batch].to(device)) for i in range(0, n, batch)]
    torch.set_grad_enabled(False)

    def forward() -> None:
        for x in inputs:
            encoder(x).float().cpu()  # as embed_shard takes the features off the device
        sync(device)

    def embed() -> None:
        embed_shard(source, scratch / "features.tar", encoder, transform, batch, device)

    forward()  # warm-up
    t_forward, t_embed = float("inf"), float("inf")
    for _ in range(3):
        t_forward, t_embed = min(t_forward, _timed(forward)), min(t_embed, _timed(embed))
    print(f"machine: {cpu_count()} CPUs, timed on {describe(device)}")
    print(f"encoder {cfg.encoder.name}: {transform.out_side}-px inputs, {dim} features; {n} patches, "
          f"batches of {batch}")
    print(f"(a) encoder forward alone:  {n / t_forward:8.0f} patches/s")
    print(f"(b) embedding (read, transform, forward, write): {n / t_embed:8.0f} patches/s  "
          f"(b)/(a) = {t_forward / t_embed:.2f} (floor {FLOOR_EMBED_VS_FORWARD})")

    figures = {"device": describe(device), "encoder": cfg.encoder.name, "input_px": transform.out_side,
               "features": dim, "patches": n, "batch_size": batch, "forward_patches_per_s": n / t_forward,
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


if __name__ == "__main__":
    sys.exit(main())
