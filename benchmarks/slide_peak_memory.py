"""Peak memory of slide prediction: `python benchmarks/slide_peak_memory.py SLIDE OUT TILE WORKERS [BACKEND]` prints
JSON (BACKEND: slide.backend, default auto).

Run in its own process by tests/test_slide_predict.py and benchmarks/bench_wsi.py: VmHWM of this
process, and sampled PSS of it and its loader workers together.
"""

import json
import os
import sys
import threading
import time

import numpy as np

from histoflow.data.transforms import PatchTransform
from histoflow.deployment.slide_map import SlideConfig, predict_slide
from histoflow.models import AlexNet32


def status(pid, field):  # KiB; VmHWM is the process's own peak RSS (not inherited through fork or exec)
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0

def pss(pid):  # proportional set size, KiB: pages shared between processes split among them
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []

peak = {"total_pss": 0, "worker": 0}
done = threading.Event()
def sample():  # every 20 ms: this process and its loader workers together, and the largest worker
    while not done.is_set():
        kids = children(os.getpid())
        peak["total_pss"] = max(peak["total_pss"], sum(pss(p) for p in [os.getpid(), *kids]))
        peak["worker"] = max([peak["worker"], *(status(p, "VmHWM") for p in kids)])
        time.sleep(0.02)

slide, out, tile, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
backend = sys.argv[5] if len(sys.argv) > 5 else "auto"
models = [(AlexNet32(num_classes=8, input_size=32), PatchTransform(32, {"mean_image": np.full((32, 32, 3), 200.0)}))]
before = status("self", "VmHWM")
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
result = predict_slide(slide, models, [f"c{i}" for i in range(8)], SlideConfig(tile_size=tile, mpp=None,
                       batch_size=64, num_workers=workers, progress=False, backend=backend), out)
done.set()
sampler.join()
print(json.dumps({"tiles": result.tiles, "seconds": result.seconds, "before": before * 1024,
                  "self": status("self", "VmHWM") * 1024, **{k: v * 1024 for k, v in peak.items()}}))
