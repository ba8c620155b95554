"""histolab's grid tiler on one slide, for bench_wsi.py --peer: run by the peer's own Python (benchmarks/peer_venv.sh
makes it), never imported by histoflow.

    python benchmarks/peer_tiler.py SLIDE TILE_PX TISSUE_PERCENT OUT_DIR    # prints one JSON line

Times histolab 0.7.0's GridTiler at level 0 over the whole tissue (TissueMask, not the default biggest box),
keeping tiles with at least TISSUE_PERCENT % tissue by its own per-tile check: first its tile generator alone
(tiles read, decoded and checked, held in memory one at a time), then extract(), which also saves each tile as a
PNG, its only way of handing tiles over.
"""

import json
import sys
import time

import histolab
from histolab.masks import TissueMask
from histolab.slide import Slide
from histolab.tiler import GridTiler

path, tile, percent, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
slide = Slide(path, processed_path=out)
tiler = GridTiler(tile_size=(tile, tile), level=0, check_tissue=True, tissue_percent=percent, suffix=".png")
t0 = time.perf_counter()
tiles = sum(1 for _ in tiler._tiles_generator(slide, TissueMask()))  # extract()'s own generator, without saving
generate = time.perf_counter() - t0
t0 = time.perf_counter()
tiler.extract(slide, TissueMask(), log_level="WARNING")
extract = time.perf_counter() - t0
print(json.dumps({"peer": f"histolab {histolab.__version__}", "tiles": tiles, "generate_s": generate,
                  "extract_s": extract}))
