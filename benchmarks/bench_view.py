"""histoflow view's deep-zoom tiles: the latency of a 254-px tile (256 px with its overlap) on the CMU slide, cold
(never made before, the slide freshly opened) and warm (from the viewer's LRU cache), in this process and over HTTP
from a running server (aiohttp, the tile made in its thread pool).

    HISTOFLOW_DATA=../shared/data python benchmarks/bench_view.py [--slide PATH] [--levels 3] [--backend auto]

Tiles of the finest `levels` deep-zoom levels (where panning spends its time), every tile once in a shuffled order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from aiohttp import web

from histoflow.slides.backend import open_slide
from histoflow.viewer.deepzoom import DeepZoom
from histoflow.viewer.run_folder import RunFolder, SlideEntry
from histoflow.viewer.server import LOCAL, bind, make_app
from histoflow.viewer.site import Site


def percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"n={len(a)} median {np.median(a):.1f} ms, p95 {np.percentile(a, 95):.1f} ms, max {a.max():.1f} ms"


def tile_keys(zoom: DeepZoom, levels: int, seed: int = 0) -> list[tuple[int, int, int]]:
    keys = [k for k in zoom.tiles() if k[0] >= zoom.level_count - levels]
    random.Random(seed).shuffle(keys)
    return keys


def in_process(path: Path, backend: str, levels: int) -> None:
    with open_slide(path, backend) as slide:
        zoom = DeepZoom(slide)
        keys = tile_keys(zoom, levels)
        for label in ("cold", "warm"):
            ms = []
            for key in keys:
                t0 = time.perf_counter()
                zoom.tile(*key)
                ms.append((time.perf_counter() - t0) * 1e3)
            print(f"  in process, {label}: {percentiles(ms)}")


def over_http(path: Path, backend: str, levels: int) -> None:
    entry = SlideEntry(path.stem, path, path=path)
    site = Site(RunFolder(path.parent, None, {entry.name: entry}), backend)
    sock = bind(LOCAL, None)
    loop = asyncio.new_event_loop()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(make_app(site), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner

    runner = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    base = f"http://{LOCAL}:{sock.getsockname()[1]}/slides/{entry.name}_files"
    try:
        keys = tile_keys(site.zoom(entry), levels)
        for label in ("cold", "warm"):
            ms = []
            for level, col, row in keys:
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{base}/{level}/{col}_{row}.jpeg") as r:
                    r.read()
                ms.append((time.perf_counter() - t0) * 1e3)
            print(f"  over HTTP, {label}: {percentiles(ms)}")
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main() -> None:
    data = Path(os.environ.get("HISTOFLOW_DATA", "../shared/data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=data / "wsi" / "cmu-1-small-region.svs")
    parser.add_argument("--levels", type=int, default=3, help="the finest deep-zoom levels to request")
    parser.add_argument("--backend", nargs="+", default=["auto", "tifffile"])
    args = parser.parse_args()
    for backend in args.backend:
        with open_slide(args.slide, backend) as slide:
            print(f"{args.slide.name} through {type(slide).__name__} ({backend}): {slide.dimensions} px, "
                  f"{len(slide.levels)} level(s)")
        in_process(args.slide, backend, args.levels)
        over_http(args.slide, backend, args.levels)


if __name__ == "__main__":
    main()
