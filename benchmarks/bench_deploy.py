"""Five-fold prediction of new images with a frozen encoder, before and after "encoder once" (issue 36).

    python benchmarks/bench_deploy.py [--data DIR] [--images 100] [--folds 5] [--encoder squeezenet1_1|mobilenet_v2]
                                      [--window 192] [--stride 48] [--workers 0] [--device auto] [--json FILE]

The lymphoma_patients / lymphoma_abmil setting: 192-px windows every 48 px of the lymphoma images (15 a 417 x 312
image), resized to 224 px for an ImageNet encoder of ../shared/weights; --folds heads on it (an MLP head for the
patch vote, ABMIL on image bags of the windows in both rotations), with fresh weights (the speed does not depend on
them). Each is timed twice over the same images: `per model` runs the encoder once for every fold model (the path
before: encoder_groups(share=False)), `shared` once for all of them. Prints encoder passes (windows through the
encoder), wall seconds and images/s, and checks that both give the same probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from common import add_common_args, describe, device_of

from histoflow.data.images import IMAGE_SUFFIXES
from histoflow.data.transforms import PatchTransform
from histoflow.deployment.bag_predict import predict_bags
from histoflow.inference.fold_models import FoldModel, encoder_groups
from histoflow.inference.voting import grid_config, predict_images
from histoflow.models import ABMIL, MLPHead, build_encoder

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = {"squeezenet1_1": "squeezenet1_1-imagenet-features.pth", "mobilenet_v2": "mobilenet_v2-imagenet-features.pth"}


def fold_models(encoder_name: str, weights: Path, folds: int, window: int, stride: int, bags: bool) -> list[FoldModel]:
    """`folds` heads on one frozen encoder, as load_fold_model gives them (encoder + head, one encoder key)."""
    cfg = {"_target_": "histoflow.models.torchvision_model", "name": encoder_name, "weights": str(weights),
           **({"activation": "relu"} if encoder_name == "mobilenet_v2" else {})}
    transform = PatchTransform(window, {"mean_image": np.zeros((window, window, 3))}, "fixed",
                               mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], resize=224)
    models = []
    for fold in range(1, folds + 1):
        torch.manual_seed(fold)
        encoder, dim = build_encoder(cfg, 224)  # each fold model loads its own copy, as from its checkpoint
        head = ABMIL(dim, 3) if bags else MLPHead(dim, 3)
        config = {"model": {"_target_": "histoflow.models.ABMIL" if bags else "histoflow.models.MLPHead"},
                  "data": {"patches": {"size": window, "stride": stride, "rotations": [0, 90]}},
                  "bag": {"level": "image"}, "encoder": cfg}
        net = torch.nn.Sequential(OrderedDict(encoder=encoder, head=head.eval()))
        models.append(FoldModel(Path(f"fold{fold}.ckpt"), str(fold), ["CLL", "FL", "MCL"], net, transform, config,
                                encoder_key=f"{encoder_name}:{weights.name}"))
    return models


def counted(models: list[FoldModel]) -> list[int]:
    """A counter of the windows every model's encoder embeds."""
    calls = [0]
    for m in models:
        m.encoder.register_forward_hook(lambda mod, args, out: calls.__setitem__(0, calls[0] + len(args[0])))
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=shared, help="the folder holding lymphoma/")
    parser.add_argument("--weights", type=Path, default=shared.parent / "weights")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--encoder", default="squeezenet1_1", choices=sorted(WEIGHTS))
    parser.add_argument("--window", type=int, default=192)
    parser.add_argument("--stride", type=int, default=48)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    add_common_args(parser)
    args = parser.parse_args()
    device = device_of(args.device)
    paths = sorted(p for p in (args.data / "lymphoma").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    print(f"device: {describe(device)}; {len(paths)} lymphoma images; "
          f"{args.folds} fold models on frozen {args.encoder}; {args.window}-px windows every {args.stride} px, at 224")
    figures: dict[str, dict[str, float]] = {}
    for kind in ("patch vote", "ABMIL bags"):
        bags = kind != "patch vote"
        found = {}
        for share in (False, True):
            models = fold_models(args.encoder, args.weights / WEIGHTS[args.encoder], args.folds, args.window,
                                 args.stride, bags)
            calls = counted(models)
            t0 = time.perf_counter()
            if bags:
                out = predict_bags(paths, models, args.batch_size, args.workers, str(device), False, share=share)
                probs = out.probs.mean(1)
            else:
                votes = predict_images(paths, encoder_groups(models, share), 3, grid_config(args.window, args.stride),
                                       batch_size=args.batch_size, num_workers=args.workers, device=str(device),
                                       progress=False)
                probs = votes.mean_prob()
            seconds = time.perf_counter() - t0
            found[share] = probs
            name = f"{kind}, {'shared encoder' if share else 'encoder per model (before)'}"
            figures[name] = {"encoder_passes": calls[0], "seconds": round(seconds, 2),
                             "images_per_s": round(len(paths) / seconds, 2)}
            print(f"{name:50s} {calls[0]:7d} encoder passes  {seconds:7.1f} s  {len(paths) / seconds:6.2f} images/s")
        same = np.allclose(found[True], found[False], atol=1e-5)
        print(f"{kind}: same probabilities both ways: {same} (max difference "
              f"{np.abs(found[True] - found[False]).max():.2e})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
