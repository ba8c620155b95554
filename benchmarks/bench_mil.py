"""Attention MIL on cached features (issue 27): (a) a five-fold ABMIL sweep on the cached embeddings of the lymphoma
images as a user runs it (`histoflow train -m experiment=lymphoma_abmil fold=1,2,3,4,5`, a fresh process: start,
five folds and the k-fold report included; target: under 2 minutes on this 2-core CPU); (b) ABMIL's forward on one
20,000-tile bag, each size in a fresh process: peak memory (ru_maxrss) above the process before the forward, against
the bag's own size.

    python benchmarks/bench_mil.py [--data DIR] [--work DIR] [--encoder squeezenet1_1_imagenet] [--tiles 20000]
                                   [--skip-sweep]

--data names the folder holding lymphoma/ (default $HISTOFLOW_DATA, else ../shared/data beside the repo). The
lymphoma images are prepared and embedded once (untimed, reused: --work, default the repository's data/ folder as
train.py uses it) before the sweep is timed. Exits 0 whatever the numbers; 2 without data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def forward_peak(tiles: int, dim: int) -> dict:
    """In this (fresh) process: ABMIL's forward on one bag of `tiles` x `dim` features, peak RSS above the start."""
    import torch

    from histoflow.models import ABMIL

    torch.manual_seed(0)
    head = ABMIL(dim, 3).eval()
    x = torch.randn(1, tiles, dim)
    with torch.inference_mode():
        head(x[:, :10])  # warm up the kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        logits = head(x)
        a = head.attention_weights(x)
        seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tiles": tiles, "dim": dim, "bag_mib": x.numel() * 4 / 2**20, "peak_above_mib": (after - before) / 1024,
            "seconds": seconds, "finite": bool(torch.isfinite(logits).all()), "attention_sum": float(a.sum())}


def sweep(data: Path, work: Path, encoder: str) -> None:
    base = [f"data.root={data / 'lymphoma'}", f"paths.data_dir={work}", f"encoder={encoder}", "logger=csv"]
    print("(a) five-fold ABMIL sweep on cached features, process start included")
    warm = [sys.executable, "-c", (
        "import sys; from hydra import compose, initialize_config_dir; import hydra\n"
        "from histoflow.common.config import CONF_DIR\n"
        "from histoflow.features.embeddings import Embedder\n"
        "with initialize_config_dir(str(CONF_DIR), version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=lymphoma_abmil', *sys.argv[1:]], return_hydra_config=True)\n"
        "dm = hydra.utils.instantiate(cfg.data, fold=1, _recursive_=False, embed=Embedder(cfg.encoder),\n"
        "    preprocess=__import__('histoflow.models', fromlist=['x']).input_preprocess(cfg.model, cfg.encoder))\n"
        "dm.prepare_data()\n"), *base]
    t0 = time.perf_counter()
    subprocess.run(warm, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"    preparation and embedding found or made first (untimed): {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", "-m", "experiment=lymphoma_abmil", *base, "fold=1,2,3,4,5",
               f"hydra.sweep.dir={tmp}/sweep"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"the sweep failed ({done.returncode})")
        report = json.loads((Path(tmp) / "sweep" / "image_report" / "report.json").read_text())
    pooled, (low, high) = report["pooled"]["image/acc"], report["interval"]["image/acc"]
    print(f"    {' '.join(cmd[1:])}")
    print(f"    {seconds:.1f} s wall-clock ({'under' if seconds < 120 else 'OVER'} the 2-minute target), "
          f"pooled image accuracy {pooled:.3f} [{low:.2f}, {high:.2f}] over {report['groups']['n']} cases")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared/data")))
    parser.add_argument("--work", type=Path, default=REPO / "data")
    parser.add_argument("--encoder", default="squeezenet1_1_imagenet")
    parser.add_argument("--tiles", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--forward", type=int, help=argparse.SUPPRESS)  # the child process of (b)
    args = parser.parse_args()
    if args.forward:
        print(json.dumps(forward_peak(args.forward, args.dim)))
        return
    print(f"torch threads: {__import__('torch').get_num_threads()}, CPUs: {os.cpu_count()}")
    if not args.skip_sweep:
        if not (args.data / "lymphoma").is_dir():
            print(f"no lymphoma data in {args.data}: pass --data", file=sys.stderr)
            raise SystemExit(2)
        sweep(args.data, args.work.resolve(), args.encoder)
    print(f"(b) ABMIL forward on one bag ({args.dim}-d features, projection 128, attention 128), a fresh process each")
    for tiles in args.tiles:
        out = subprocess.run([sys.executable, __file__, "--forward", str(tiles), "--dim", str(args.dim)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"    {r['tiles']:>6} tiles: bag {r['bag_mib']:.0f} MiB, peak memory {r['peak_above_mib']:.0f} MiB above "
              f"the process before the forward, {r['seconds'] * 1000:.0f} ms, finite {r['finite']}, attention sum "
              f"{r['attention_sum']:.6f}")


if __name__ == "__main__":
    main()
