"""Batched patch augmentation: histoflow's PatchTransform against kornia.augmentation doing the same work.

    python benchmarks/bench_transforms.py [--batch 128] [--side 36] [--crop 32] [--rounds 5]

The training transform of the lymphoma recipe: uint8 (B, S, S, 3) patches -> a random crop of each, random
flips of both axes, minus the training mean image at the pixels each output pixel came from, / 255 -> float
(B, 3, c, c). kornia draws its parameters per sample too (RandomCrop, RandomHorizontalFlip, RandomVerticalFlip
in an AugmentationSequential); the mean image is subtracted before its crop, which is the same arithmetic. Also
timed: colour jitter (brightness, contrast, saturation, hue 0.2/0.2/0.2/0.05) both ways. Prints patches/s,
best of --rounds with the contenders alternating (the machine may be shared); the first output shapes are
checked equal. kornia is not a dependency: install it to run this (pip install kornia).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from histoflow.data.transforms import PatchTransform


def best_rate(fn, n: int, rounds: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--side", type=int, default=36)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed pass")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import kornia.augmentation as K
    except ImportError:
        print("kornia is not installed (pip install kornia): nothing to compare", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, 256, (args.batch, args.side, args.side, 3), dtype=np.uint8))
               for _ in range(args.batches)]
    mean_image = rng.uniform(100, 200, (args.side, args.side, 3))
    n = args.batch * args.batches
    jitter = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05}
    ours = PatchTransform(args.crop, {"mean_image": mean_image}, "image", train=True)
    ours_jitter = PatchTransform(args.crop, {"mean_image": mean_image}, "image", train=True, jitter=jitter)
    mean = torch.as_tensor(mean_image, dtype=torch.float32).permute(2, 0, 1)
    theirs = K.AugmentationSequential(K.RandomCrop((args.crop, args.crop)), K.RandomHorizontalFlip(),
                                      K.RandomVerticalFlip())
    colour = K.ColorJitter(0.2, 0.2, 0.2, 0.05, p=1.0)

    def kornia_plain() -> list[torch.Tensor]:
        return [theirs(b.permute(0, 3, 1, 2).float() - mean) / 255.0 for b in batches]

    def kornia_jitter() -> list[torch.Tensor]:
        # kornia's colour jitter takes 0-1 images; the mean image is subtracted after it, as in PatchTransform
        return [theirs(colour(b.permute(0, 3, 1, 2).float() / 255.0) - mean / 255.0) for b in batches]

    assert ours(batches[0]).shape == kornia_plain()[0].shape == (args.batch, 3, args.crop, args.crop)
    rows = []
    for name, a, b in (("crop + flips + mean image", lambda: [ours(x) for x in batches], kornia_plain),
                       ("colour jitter + crop + flips", lambda: [ours_jitter(x) for x in batches], kornia_jitter)):
        rate_ours, rate_theirs = 0.0, 0.0
        for _ in range(args.rounds):  # alternate, each keeps its best
            rate_ours = max(rate_ours, best_rate(a, n, 1))
            rate_theirs = max(rate_theirs, best_rate(b, n, 1))
        rows.append((name, rate_ours, rate_theirs))
    print(f"batches of {args.batch} patches {args.side}x{args.side}, crops {args.crop}, torch threads "
          f"{torch.get_num_threads()}, kornia {sys.modules['kornia'].__version__}")
    for name, rate_ours, rate_theirs in rows:
        print(f"{name:32s} PatchTransform {rate_ours:10.0f} patches/s   kornia {rate_theirs:10.0f} patches/s   "
              f"ratio {rate_ours / rate_theirs:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
