"""Whole-image prediction throughput (images/s) on the real lymphoma images, against the net's pure forward rate.

    python benchmarks/bench_predict.py [--data DIR] [--ckpt FILE] [--images N] [--workers W] [--batch-size B]
                                       [--passes P] [--repeat R] [--chunks K] [--models M] [--device auto|cpu|cuda]
                                       [--json FILE] [--check]

Prints (a) whole-image prediction as predict.py runs it: loader workers read each PNG and cut its 36-px grid
windows (stride 32) as uint8; on the net's device each batch is centre-cropped and normalised, the net runs, votes
per image; (b) the net's pure forward pass (inference mode) on the same patches, already preprocessed and held in
memory on the device, in batches of the same size; (c) the image reader alone (read, cut; no transform, no net; the
transform is the device's now). Floor: (a) >=
0.8 (b), so reading, cutting and voting are not the bottleneck. Other load on a shared machine comes
and goes, so (a) and (b) alternate on --chunks chunks of the images and the floor is checked on the
median of the per-chunk ratios (the totals are printed too). The
net is the lymphoma recipe's AlexNet32 (a trained --ckpt or fresh weights: the speed is the same); --models M
predicts with M copies, as the M fold models of one run predict new images (one preprocessing for all: prepared
once a batch), and (b) runs the M nets.
--data names the folder holding lymphoma/ (default $HISTOFLOW_DATA, else ../shared/data). Exits 0
whatever the numbers unless --check is given (then 1 when the floor is missed); 2 without data. --device (default
auto: the GPU when there is one) runs (a) and (b) there; (b) then waits for the device before its clock stops.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import add_common_args, describe, device_of, sync, write_figures
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from histoflow.common.machine import AUTO, cpu_count, resolve_workers
from histoflow.data.images import IMAGE_SUFFIXES
from histoflow.data.transforms import PatchTransform
from histoflow.inference.fold_models import load_fold_model
from histoflow.inference.voting import ImagePatches, grid_config, predict_images
from histoflow.models import AlexNet32

REPO = Path(__file__).resolve().parents[1]
FLOOR = 0.8  # (a) / (b)


def model_and_transform(ckpt: Path | None) -> tuple[nn.Module, PatchTransform]:
    """A trained checkpoint's net and preprocessing, or a fresh AlexNet32 with the recipe's preprocessing."""
    if ckpt is not None:
        m = load_fold_model(ckpt)
        return m.net, m.transform
    stats = {"mean_image": np.full((36, 36, 3), 128.0)}  # the values do not change the speed
    return AlexNet32(num_classes=3, input_size=32).eval(), PatchTransform(32, stats, "image", train=False)


def forward_rate(nets: list[nn.Module], batches: list[torch.Tensor], device: torch.device) -> float:
    """Patches/s of the nets alone (each on every patch) over batches already on their device (after a warm-up)."""
    with torch.inference_mode():
        nets[0](batches[0])
        sync(device)
        t0 = time.perf_counter()
        for x in batches:
            for net in nets:
                net(x).softmax(-1)
        sync(device)
        return sum(len(x) for x in batches) / (time.perf_counter() - t0)


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its exited children (RUSAGE_CHILDREN)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=shared, help="the folder holding lymphoma/")
    parser.add_argument("--ckpt", type=Path, default=None, help="a trained checkpoint (default: fresh AlexNet32)")
    parser.add_argument("--images", type=int, default=None, help="predict only the first N images")
    defaults = OmegaConf.load(REPO / "conf" / "predict.yaml")
    parser.add_argument("--workers", default=defaults.num_workers, help="reader workers (default: predict.yaml's)")
    parser.add_argument("--batch-size", type=int, default=int(defaults.batch_size))
    parser.add_argument("--passes", type=int, default=1, help="passes over the images")
    parser.add_argument("--repeat", type=int, default=1,
                        help="list every image this many times: a larger set of the same files, where few are at hand")
    parser.add_argument("--chunks", type=int, default=6, help="chunks of images per pass, timed in alternation")
    parser.add_argument("--models", type=int, default=1, help="fold models of one run predicting every image")
    parser.add_argument("--check", action="store_true", help="exit 1 when the floor is missed")
    add_common_args(parser)
    args = parser.parse_args()
    lymphoma = args.data / "lymphoma"
    if not lymphoma.is_dir():
        print(f"{lymphoma}: not found. Fix: pass --data or set HISTOFLOW_DATA to the folder holding lymphoma/")
        return 2
    device = device_of(args.device)
    setting = args.workers if args.workers == AUTO else int(args.workers)
    args.workers = resolve_workers(setting, "num_workers", device.type)
    print(f"device: {describe(device)}; reader workers: {setting} -> {args.workers} ({cpu_count()} CPUs)")
    paths = sorted(p for p in lymphoma.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: args.images] * args.repeat
    net, transform = model_and_transform(args.ckpt)
    net = net.to(device)
    grid = grid_config(36, 32)

    t0 = time.perf_counter()
    reader = DataLoader(ImagePatches(paths, grid), batch_size=None, num_workers=args.workers,
                        collate_fn=lambda item: item)
    windows = torch.cat([item.x[0] for item in reader])  # (N, 36, 36, 3) uint8, as the workers ship them
    read = len(paths) / (time.perf_counter() - t0)
    patches = transform(windows)  # (N, 3, 32, 32): (b)'s inputs, preprocessed beforehand
    per_image = len(patches) / len(paths)
    print(f"lymphoma: {len(paths)} images, {len(patches):,} patches ({per_image:.0f} per image); batch "
          f"{args.batch_size}, {args.workers} reader worker(s), {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs")

    # Load from other processes comes and goes within seconds, so the two are timed in alternation, chunk by
    # chunk of images; the floor is checked on the median of the per-chunk ratios.
    forward_s, predict_s, ratios = 0.0, 0.0, []
    cpu = {"forward": 0.0, "predict": 0.0, "readers": 0.0}
    for _ in range(args.passes):
        for chunk in np.array_split(np.arange(len(paths)), args.chunks):
            lo, hi = int(chunk[0] * per_image), int((chunk[-1] + 1) * per_image)
            c0 = cpu_seconds(resource.RUSAGE_SELF)
            t_forward = (hi - lo) / forward_rate([net] * args.models, list(patches[lo:hi].to(device).split(
                args.batch_size)), device)
            c1, k1 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
            votes = predict_images([paths[i] for i in chunk], [(net, transform)] * args.models, 3, grid,
                                   batch_size=args.batch_size,
                                   num_workers=args.workers, device=str(device), progress=False)
            cpu["forward"] += c1 - c0
            cpu["predict"] += cpu_seconds(resource.RUSAGE_SELF) - c1
            cpu["readers"] += cpu_seconds(resource.RUSAGE_CHILDREN) - k1  # workers, counted once they have exited
            forward_s, predict_s = forward_s + t_forward, predict_s + votes.seconds
            ratios.append(t_forward / votes.seconds)
    n = len(paths) * args.passes
    predict, forward = n / predict_s, n / forward_s
    print(f"(a) whole-image prediction:       {predict:8.1f} images/s ({predict * per_image:,.0f} patches/s)")
    print(f"(b) pure forward, in memory:      {forward:8.1f} images/s ({forward * per_image:,.0f} patches/s)")
    print(f"(c) reader alone (read+cut):      {read:8.1f} images/s")
    print(f"CPU time: (b) {cpu['forward']:.1f} s; (a) {cpu['predict']:.1f} s in this process + {cpu['readers']:.1f} s "
          f"in reader workers (ratio {cpu['forward'] / (cpu['predict'] + cpu['readers']):.2f}: what an idle machine "
          "would show)")
    ratio = float(np.median(ratios))
    ok = ratio >= FLOOR
    ceiling = min(forward, read)  # issue 39: the net's forward, or the CPU reader where it is the slower
    which = "the forward" if forward <= read else "the reader"
    print(f"(a) / min((b), (c)) = {predict / ceiling:.2f} (the ceiling: {which})")
    print(f"(a)/(b) = {ratio:.2f} (median of {len(ratios)} alternating chunks; {predict / forward:.2f} overall)  "
          f"floor {FLOOR:g}: {'ok' if ok else 'MISSED'}")
    write_figures(args.json, {"device": describe(device), "batch_size": args.batch_size, "workers": args.workers,
                              "models": args.models,
                              "images": len(paths), "patches_per_image": per_image,
                              "predict_patches_per_s": predict * per_image,
                              "forward_patches_per_s": forward * per_image,
                              "reader_images_per_s": read, "predict_over_forward_median": ratio,
                              "predict_over_forward_overall": predict / forward,
                              "predict_over_ceiling": predict / ceiling})
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
