"""Whole-slide prediction throughput (tiles/s) against the pure forward rate of the same tiles held in memory.

    python benchmarks/bench_wsi.py [--side 6000] [--tile 224] [--models alexnet resnet18] [--workers 0 2]
                                   [--backends tifffile openslide]
                                   [--batch 32] [--repeats 2] [--real DIR] [--memory] [--peer PYTHON]
                                   [--device auto|cpu|cuda] [--decode auto cpu device]
                                   [--json FILE]

A synthetic JPEG-tiled pyramid (`--side` px square at level 0, 512-px tiles, two round tissue sections on glass)
is predicted at level 0 with torchvision nets (random weights, the kather_transfer input: 224-px tiles, channel
normalisation). For each net: the forward rate on the tissue tiles already decoded and normalised in memory,
then predict_slide's rate (reading, decoding, normalising in loader workers while the net runs) and their ratio;
the floor is 0.7. --real DIR also predicts DIR/tcga-cr-7395-01a-01-ts1.svs (JPEG 2000 tiles, slow to decode) at
level 0. --memory prints the peak memory of predicting pyramids of --memory-sides px (default 10,000 and 50,000;
tissue tiles cut from the real CMU-1 slide with --real) through each backend: the same, the bound does not grow
with the slide. --peer PYTHON (a histolab venv's, made by benchmarks/peer_venv.sh) also times tiling the same
slides and a --peer-side px pyramid of real tissue tiles (levels as pages), to memory and to disk, by histoflow
through each backend and by histolab's GridTiler, side by side.
--device (default auto: the GPU when there is one) runs the nets there; the forward rate
then waits for the device before its clock stops. --decode (slide.decode, default auto) times predict_slide with each
value; where the stored tiles are JPEG, the decode on --device alone (one process, decode_batch: the stored tiles'
bytes read, decoded in one call, the grid's tiles cut out) is timed beside the CPU reader's. Exits 0 whatever the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import add_common_args, describe, device_of, sync, write_figures

from histoflow.data.transforms import PatchTransform
from histoflow.deployment.slide_map import SlideConfig, predict_slide
from histoflow.slides.backend import open_slide
from histoflow.slides.tiles import SlideTiles, TileGeometry, tile_loader, tissue_tiles
from histoflow.testing.slide_shards import write_slide_shards
from histoflow.testing.synthetic_slide import H_E_MEAN, write_pyramid

FLOOR = 0.7
H_E_STD = np.array([25.0, 25.0, 25.0])


def forward_rate(net: torch.nn.Module, x: torch.Tensor, batch: int, device: torch.device) -> float:
    """Tiles/s of the net alone on normalised tiles x (N, 3, s, s) already on its device."""
    with torch.inference_mode():
        net(x[:batch])  # warm-up: first-call allocations
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            net(x[i:i + batch]).softmax(-1)
        sync(device)
        return len(x) / (time.perf_counter() - t0)


def device_decode_rate(path: Path, origins: np.ndarray, geometry: TileGeometry, batch: int, device: torch.device,
                       backend: str, reader: np.ndarray) -> tuple[float | None, int | None]:
    """Tiles/s of the stored JPEG tiles decoded on `device` in this process (slide.decode=device), and their largest
    difference from the CPU reader's tiles `reader` in grey levels; None, None where the slide's tiles are not JPEG."""
    tiles = SlideTiles(path, origins, geometry, batch, backend=backend, decode="device", device=device)
    if tiles.jpeg is None:
        return None, None
    t0 = time.perf_counter()
    batches = [(index, x) for index, x, _ in tile_loader(tiles, 0)]
    sync(device)
    rate = len(origins) / (time.perf_counter() - t0)
    differs = max(int((x.cpu().int() - torch.from_numpy(reader[i * batch:i * batch + len(x)]).int()).abs().max())
                  for i, x in batches)
    return rate, differs


def bench_slide(path: Path, level: int, tile: int, names: list[str], workers: list[int], batch: int, repeats: int,
                out: Path, device: torch.device, backend: str, decodes: tuple[str, ...] = ("auto",)) -> list[dict]:
    """Print the forward rate, predict_slide's rate and their ratio for each net and worker count, the slide read
    through `backend` (slide.backend); return them."""
    stats = {"mean_image": np.full((tile, tile, 3), H_E_MEAN), "channel_mean": np.array(H_E_MEAN),
             "channel_std": H_E_STD}
    transform = PatchTransform(tile, stats, "channel")
    with open_slide(path, backend) as slide:
        geometry = TileGeometry.of(slide, tile, level=level)
        origins = tissue_tiles(slide, geometry)
        dims = slide.dimensions
    t0 = time.perf_counter()
    tiles = SlideTiles(path, origins, geometry, batch, backend=backend).read(origins)
    read_rate = len(tiles) / (time.perf_counter() - t0)
    decode_rate, differs = (device_decode_rate(path, origins, geometry, batch, device, backend, tiles)
                            if "device" in decodes else (None, None))
    x = transform(tiles[:4 * batch]).to(device)  # the forward rate is per batch: a few batches measure it
    print(f"\n{path.name} ({backend}): {dims[0]} x {dims[1]} px, {len(origins)} tissue tiles of {tile} px at level "
          f"{level}; reading + decoding alone, one process: {read_rate:.0f} tiles/s"
          + (f"; stored JPEG tiles decoded on {device}: {decode_rate:.0f} tiles/s ({decode_rate / read_rate:.2f}x), "
             f"at most {differs} grey levels from the reader's" if decode_rate else ""))
    print(f"{'model':<10} {'forward tiles/s':>16} {'decode':>7} {'workers':>8} {'slide tiles/s':>14} {'ratio':>6} "
          f"{'wall s':>7}")
    rows = []
    for name in names:
        torch.manual_seed(0)
        net = torchvision.models.get_model(name, weights=None, num_classes=9).eval().to(device)
        for w, decode in ((w, d) for d in decodes for w in workers):
            # best of `repeats`, each forward rate taken just before its slide run: on a shared machine the load
            # drifts from run to run, and the best runs are the least disturbed ones of both
            pure = speed = wall = 0.0
            for _ in range(repeats):
                pure = max(pure, forward_rate(net, x, batch, device))
                cfg = SlideConfig(backend=backend, tile_size=tile, level=level, mpp=None, batch_size=batch,
                                  num_workers=w, progress=False, device=str(device), decode=decode)
                t0 = time.perf_counter()
                result = predict_slide(path, [(net, transform)], [f"c{i}" for i in range(9)], cfg, out)
                wall = max(wall, time.perf_counter() - t0)
                speed = max(speed, result.tiles_per_s)
            ratio = speed / pure
            flag = "" if ratio >= FLOOR else f"  < {FLOOR}"
            print(f"{name:<10} {pure:>16.1f} {decode:>7} {w:>8} {speed:>14.1f} {ratio:>6.2f} {wall:>7.1f}{flag}",
                  flush=True)
            rows.append({"slide": path.name, "backend": backend, "read_tiles_per_s": read_rate, "tiles": len(origins),
                         "device_decode_tiles_per_s": decode_rate,
                         "device_decode_over_read": decode_rate / read_rate if decode_rate else None,
                         "device_decode_max_difference": differs,
                         "model": name, "workers": w, "decode": decode,
                         "forward_tiles_per_s": pure, "slide_tiles_per_s": speed, "slide_over_forward": ratio})
    return rows


MEMORY_SCRIPT = Path(__file__).with_name("slide_peak_memory.py")  # the same measurement as the memory test


def real_tissue_tiles(svs: Path, tile: int = 512, n: int = 8) -> list[np.ndarray] | None:
    """The `n` most stained tile x tile regions of a real slide (its level 0, a grid of non-overlapping tiles), or
    None when there is no such slide."""
    if not svs.exists():
        return None
    with open_slide(svs, "tifffile") as slide:
        w, h = slide.dimensions
        regions = [slide.read_region((x, y), 0, (tile, tile))
                   for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
    return sorted(regions, key=lambda r: r.mean())[:n]  # darkest first: the most tissue, the least glass


def bench_memory(work: Path, backends: list[str], sides: list[int], tissue: list[np.ndarray] | None) -> list[dict]:
    """Peak memory of predicting pyramidal slides of growing side (levels as successive pages, which both
    backends read as a pyramid), at level 0 with the same 256-px tiles: the tiles grow with the slide's area,
    the memory must not."""
    kind = "real tissue tiles (CMU-1 SVS)" if tissue is not None else "synthetic noise tiles"
    print(f"\npeak memory (MiB) of slide prediction at level 0, 256-px tiles, 2 loader workers, 32-px net; "
          f"JPEG pyramids of {kind}:")
    print(f"{'backend':<10} {'side px':>8} {'decoded GB':>10} {'tiles':>7} {'s':>6} {'RSS before':>11} "
          f"{'RSS peak':>9} {'worker RSS':>11} {'total PSS':>10}")
    rows = []
    for side in sides:
        path = work / f"memory-{side}.tif"
        write_pyramid(path, side, sections=[(0.3, 0.4, 0.15), (0.75, 0.7, 0.12)], tissue_tiles=tissue,
                      subifds=False)
        for backend in backends:
            run = subprocess.run([sys.executable, str(MEMORY_SCRIPT), str(path), str(work / "out"), "256", "2",
                                  backend], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"{MEMORY_SCRIPT.name} failed on {path.name} ({backend}):\n{run.stderr[-2000:]}")
            m = json.loads(run.stdout.strip().splitlines()[-1])
            mib = {k: m[k] / 2**20 for k in ("before", "self", "worker", "total_pss")}
            print(f"{backend:<10} {side:>8} {side * side * 3 / 1e9:>10.1f} {m['tiles']:>7} {m['seconds']:>6.0f} "
                  f"{mib['before']:>11.0f} {mib['self']:>9.0f} {mib['worker']:>11.0f} {mib['total_pss']:>10.0f}",
                  flush=True)
            rows.append({"backend": backend, "side": side, "tiles": m["tiles"], "seconds": m["seconds"],
                         **{f"{k}_mib": v for k, v in mib.items()}})
        path.unlink()
    return rows


PEER_SCRIPT = Path(__file__).with_name("peer_tiler.py")


def bench_peer(path: Path, tile: int, python: Path, backends: list[str], work: Path) -> list[dict]:
    """Tiling throughput of histoflow (each backend) and of histolab's GridTiler (run by `python`, the peer's
    venv) on the same slide: level 0, tile x tile px, tiles at least half tissue, one process each. In memory:
    histoflow's tissue mask, grid and SlideTiles reads against histolab's tile generator; to disk: histoflow's
    write_slide_shards (tar shards of .npy tiles) against histolab's extract (a PNG per tile)."""
    print(f"\ntiling {path.name} at level 0, {tile}-px tiles at least 50% tissue, one process:")
    print(f"{'tiler':<26} {'tiles':>6} {'in memory tiles/s':>18} {'to disk tiles/s':>16}")
    rows = []
    for backend in backends:
        t0 = time.perf_counter()
        with open_slide(path, backend) as slide:
            geometry = TileGeometry.of(slide, tile, level=0)
            origins = tissue_tiles(slide, geometry, min_tissue=0.5)
        SlideTiles(path, origins, geometry, 64, backend=backend).read(origins)
        memory = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open_slide(path, backend) as slide:
            origins = tissue_tiles(slide, geometry, min_tissue=0.5)
        write_slide_shards(path, work / f"shards-{backend}", 0, geometry, origins, backend=backend)
        disk = time.perf_counter() - t0
        rows.append({"slide": path.name, "tiler": f"histoflow ({backend})", "tiles": len(origins),
                     "memory_tiles_per_s": len(origins) / memory, "disk_tiles_per_s": len(origins) / disk})
    out = work / "peer-tiles"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(python.parent.parent / "oslib")}
    run = subprocess.run([str(python), str(PEER_SCRIPT), str(path), str(tile), "50", str(out)], capture_output=True,
                         text=True, env=env)
    if run.returncode:
        print(f"  the peer failed ({python}): {run.stderr.strip().splitlines()[-1:]}")
    else:
        m = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append({"slide": path.name, "tiler": m["peer"], "tiles": m["tiles"],
                     "memory_tiles_per_s": m["tiles"] / m["generate_s"],
                     "disk_tiles_per_s": m["tiles"] / m["extract_s"]})
    for r in rows:
        print(f"{r['tiler']:<26} {r['tiles']:>6} {r['memory_tiles_per_s']:>18.0f} {r['disk_tiles_per_s']:>16.0f}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=6000, help="synthetic slide side, level-0 pixels")
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=["alexnet", "resnet18"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is kept")
    parser.add_argument("--real", type=Path, default=None, help="folder holding tcga-cr-7395-01a-01-ts1.svs")
    parser.add_argument("--backends", nargs="+", default=["tifffile", "openslide"], help="slide.backend values")
    parser.add_argument("--memory", action="store_true", help="also the peak memory on slides of --memory-sides px")
    parser.add_argument("--memory-sides", nargs="+", type=int, default=[10_000, 50_000])
    parser.add_argument("--decode", nargs="+", default=["auto"], choices=["auto", "cpu", "device"],
                        help="slide.decode values (device: also the stored JPEG tiles' decode alone)")
    parser.add_argument("--peer", type=Path, default=None,
                        help="the Python of a histolab venv (benchmarks/peer_venv.sh): tiling against its GridTiler")
    parser.add_argument("--peer-side", type=int, default=20_000,
                        help="--peer also tiles a pyramid of this side made of real tissue tiles (0: none)")
    add_common_args(parser)
    args = parser.parse_args()
    device = device_of(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"device {describe(device)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "synthetic.tif"
        write_pyramid(path, args.side)
        slides = [path] + ([args.real / "tcga-cr-7395-01a-01-ts1.svs"] if args.real is not None else [])
        rows = [row for slide in slides for backend in args.backends
                for row in bench_slide(slide, 0, args.tile, args.models, args.workers, args.batch, args.repeats,
                                       work / "out", device, backend, tuple(args.decode))]
        peer = []
        if args.peer is not None:
            extra = [args.real / "cmu-1-small-region.svs"] if args.real is not None else []
            if args.peer_side:
                extra.append(work / f"pyramid-{args.peer_side}.tif")
                write_pyramid(extra[-1], args.peer_side, subifds=False,
                              tissue_tiles=(real_tissue_tiles(args.real / "cmu-1-small-region.svs")
                                            if args.real else None))
            peer = [row for slide in slides + extra for row in bench_peer(slide, args.tile, args.peer, args.backends,
                                                                          work)]
        memory = []
        if args.memory:
            tissue = real_tissue_tiles(args.real / "cmu-1-small-region.svs") if args.real is not None else None
            memory = bench_memory(work, args.backends, args.memory_sides, tissue)
        write_figures(args.json, {"device": describe(device), "tile_px": args.tile, "batch_size": args.batch,
                                  "runs": rows, "peer": peer, "memory": memory})


if __name__ == "__main__":
    main()
