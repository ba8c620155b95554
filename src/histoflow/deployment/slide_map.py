"""Whole-slide prediction: every tissue tile classified, in batches, into a per-tile CSV, a class map and a heatmap.

Loader workers read, resize and normalise tiles while the main process runs the net, so reading
overlaps inference. Memory is bounded by (workers x 2 + 1) batches of tiles whatever the slide's size:
the class map is written through a memory-mapped .npy and the CSV row by row. Outputs, per slide:

    <stem>.tiles.csv    x, y (level-0 tile origin), row, col (grid cell), predicted class, prob_<class> ...
    <stem>.map.npy      float32 (rows, cols, classes) class probabilities over the tile grid, NaN without tissue
    <stem>.heatmap.png  the probability of `heatmap_class` over the slide thumbnail
    <stem>.json         geometry (level, downsample, tile and stride in level pixels), classes, counts, timing,
                        and the stored slide tiles that did not decode (`damaged`) with the grid cells left out
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from histoflow.common.config import read_section
from histoflow.common.errors import ConfigError
from histoflow.common.machine import resolve_device, resolve_workers
from histoflow.common.progress import progress_bar
from histoflow.data.transforms import PatchTransform
from histoflow.inference.heatmap import save_heatmap
from histoflow.inference.voting import Votes, mean_probabilities
from histoflow.slides.backend import open_slide
from histoflow.slides.slide import DamagedTile, DamagedTileError
from histoflow.slides.tiles import (
    NoTissueError,
    SlideTiles,
    TileGeometry,
    stored_tiles,
    tile_loader,
    tissue_tiles,
)
from histoflow.slides.tiling import TilingConfig

log = logging.getLogger(__name__)
__all__ = ["NoTissueError", "SlideConfig", "SlideResult", "default_heatmap_class", "predict_slide"]


@dataclass
class SlideConfig(TilingConfig):
    """How a slide is tiled (slides.tiling.TilingConfig, conf/slide/default.yaml: the same tiling as embed and
    data=slides; tile_size null: the patch model's training patch side) and predicted: the `slide` section of
    predict.yaml."""

    heatmap_class: str | None = None  # class drawn in the heatmap; None: the class named like TUM/TUMOR, else the last
    batch_size: int = 64  # tiles per forward pass
    num_workers: int | str = "auto"  # processes reading tiles while the model runs (0: all in this process; auto:
    #                                  0 on a CPU, the CPUs less one beside a GPU, histoflow.common.machine)
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    decode: str = "auto"  # where stored JPEG tiles are decoded: auto (the GPU where the model runs on one) | cpu |
    #                       device
    progress: bool = True  # progress bar with tiles/s
    export: list[str] | str = field(default_factory=list)  # also written per slide: geojson (QuPath's tile objects)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SlideConfig:
        return read_section(cls, cfg, "slide")


@dataclass
class SlideResult:
    """What predict_slide wrote and how fast."""

    slide: Path
    tiles: int  # tiles predicted (tissue tiles not over a damaged stored tile)
    seconds: float
    csv: Path
    map: Path
    heatmap: Path
    meta: Path
    damaged: list[DamagedTile] = field(default_factory=list)  # stored slide tiles left out (skip_damaged)
    left_out: int = 0  # tissue tiles over them, NaN in the map like tiles without tissue
    votes: np.ndarray | None = None  # (classes,) tiles predicted as each class
    prob_sum: np.ndarray | None = None  # (classes,) the tiles' probabilities summed

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / max(self.seconds, 1e-9)

    def as_votes(self) -> Votes:
        """The slide as one image of voting.Votes (its tiles as patches): its class by the image rule, `aggregate`."""
        return Votes([str(self.slide)], self.votes[None], self.prob_sum[None], np.array([self.tiles]))


def default_heatmap_class(classes: Sequence[str], wanted: str | None = None) -> int:
    """Index of `wanted`, or of the first class named like TUM/TUMOR (e.g. 01_TUMOR), else of the last class."""
    if wanted is not None:
        if wanted not in classes:
            raise ConfigError(f"slide.heatmap_class={wanted!r} is not a class of this model: {list(classes)}")
        return list(classes).index(wanted)
    tumour = [i for i, c in enumerate(classes) if re.search(r"(^|[^A-Z])TUM", c.upper())]
    return tumour[0] if tumour else len(classes) - 1


class _ModelInputs:
    """Every model's transform of a batch of uint8 tiles: (models, B, 3, c, c); run in the loader workers, or on the
    device for tiles decoded there (slide.decode)."""

    def __init__(self, transforms: Sequence[PatchTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        # a model trained on stain-normalised images gets each tile normalised (a slide has no smaller "image"), on
        # the CPU
        def stained(t: PatchTransform) -> np.ndarray | torch.Tensor:
            cpu = tiles.cpu().numpy() if isinstance(tiles, torch.Tensor) else tiles
            normalised = np.stack([t.stain(tile) for tile in cpu])
            return torch.from_numpy(normalised).to(tiles.device) if isinstance(tiles, torch.Tensor) else normalised

        return torch.stack([t(stained(t) if t.stain else tiles) for t in self.transforms])


def predict_slide(path: str | Path, models: Sequence[tuple[nn.Module, PatchTransform]], classes: Sequence[str],
                  cfg: SlideConfig, out_dir: str | Path, skip_damaged: bool = False,
                  name: str | None = None, mpp: float | None = None) -> SlideResult:
    """Classify every tissue tile of a slide with the models (averaged); write the CSV, map, heatmap and JSON.

    A stored slide tile that does not decode raises DamagedTileError (and the half-written CSV and map are
    removed), or with `skip_damaged` the tiles over it are left out: NaN in the map, absent from the CSV, listed
    in the JSON and the result. `mpp`: a slide table's `mpp` column for this slide (over the file's).
    """
    path, out = Path(path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sides = {t.side for _, t in models}
    if len(sides) != 1:
        raise ConfigError(f"the models take patches of different sides {sorted(sides)}: predict a slide with one kind")
    side = sides.pop()
    heat_index = default_heatmap_class(classes, cfg.heatmap_class)
    device = resolve_device(cfg.device, "slide.device")
    nets = [net.to(device).eval() for net, _ in models]

    with open_slide(path, cfg.backend, cfg.source_mpp, mpp=mpp) as slide:
        geometry = TileGeometry.of(slide, cfg.tile_side(side), cfg.level, cfg.mpp, cfg.stride, out_size=side)
        # with skip_damaged, stored tiles that do not decode leave the thumbnail white there (no tissue, no tiles)
        thumbnail_damage: list[DamagedTile] | None = [] if skip_damaged else None
        thumbnail = slide.thumbnail(cfg.thumbnail_size, thumbnail_damage)
        origins = tissue_tiles(slide, geometry, cfg.min_tissue, cfg.tissue_threshold, thumbnail)
        dimensions, mpp = slide.dimensions, slide.mpp
    rows, cols = geometry.grid_index(origins)
    n, k = len(origins), len(classes)
    log.info("%s: %d tissue tiles of %d px at level %d (grid %d x %d)", path.name, n, geometry.read_size,
             geometry.level, geometry.rows, geometry.cols)

    stem = name or path.stem  # the outputs' name (predict gives slides of the same file name distinct ones)
    csv_path, map_path = out / f"{stem}.tiles.csv", out / f"{stem}.map.npy"
    heat_path, meta_path = out / f"{stem}.heatmap.png", out / f"{stem}.json"
    # a memory-mapped .npy: the map of a huge grid never has to fit in memory
    prob_map = np.lib.format.open_memmap(map_path, mode="w+", dtype=np.float32, shape=(geometry.rows, geometry.cols, k))
    prob_map[:] = np.nan
    counts = np.zeros(k, np.int64)
    prob_sum = np.zeros(k, np.float64)
    damaged: set[DamagedTile] = set(thumbnail_damage or ())
    left_out: list[int] = []  # indices into origins of the tiles over damaged stored tiles
    tiles = SlideTiles(path, origins, geometry, cfg.batch_size, _ModelInputs([t for _, t in models]), cfg.backend,
                       cfg.source_mpp, cfg.decode, device)
    workers = resolve_workers(cfg.num_workers, "slide.num_workers", device.type)
    loader = tile_loader(tiles, workers, pin_memory=device.type == "cuda")
    t0, done = time.perf_counter(), 0
    try:
        with csv_path.open("w", newline="") as handle, progress_bar(cfg.progress) as bar, torch.inference_mode():
            writer = csv.writer(handle)
            writer.writerow(["x", "y", "row", "col", "predicted", *(f"prob_{c}" for c in classes)])
            task = bar.add_task(path.name, total=n, rate="")
            for index, x, bad in loader:
                if bad and not skip_damaged:
                    raise DamagedTileError(path, stored_tiles(bad))
                damaged.update(stored_tiles(bad))
                left_out += [index * cfg.batch_size + i for i in bad]
                good = np.setdiff1d(np.arange(x.shape[1]), list(bad))
                probs = mean_probabilities(nets, x.unsqueeze(2), device).numpy()[good]  # x: one view per tile
                part = index * cfg.batch_size + good
                prob_map[rows[part], cols[part]] = probs
                predicted = probs.argmax(1)
                counts += np.bincount(predicted, minlength=k)
                prob_sum += probs.sum(0)
                writer.writerows([int(ox), int(oy), int(r), int(c), classes[p], *(f"{v:.6f}" for v in pr)]
                                 for (ox, oy), r, c, p, pr in zip(origins[part], rows[part], cols[part], predicted,
                                                                  probs))
                done += x.shape[1]
                bar.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):.1f} tiles/s")
    except DamagedTileError:
        csv_path.unlink()  # half a slide's outputs would pass for its results
        map_path.unlink()
        raise
    seconds = time.perf_counter() - t0
    prob_map.flush()

    name, predicted_n = classes[heat_index], n - len(left_out)
    title = f"{path.name}: P({name}), {predicted_n} tiles of {geometry.read_size} px at level {geometry.level}"
    save_heatmap(thumbnail, prob_map[..., heat_index], geometry, dimensions, heat_path, title)
    del prob_map  # closes the memory map
    meta = {
        "slide": str(path), "dimensions": list(dimensions), "mpp": mpp, "classes": list(classes),
        "geometry": asdict(geometry), "tiles": predicted_n, "heatmap_class": name,
        "predicted_tiles": dict(zip(classes, counts.tolist())),
        "mean_probability": dict(zip(classes, (prob_sum / max(predicted_n, 1)).round(6).tolist())),
        "seconds": round(seconds, 3), "tiles_per_s": round(predicted_n / max(seconds, 1e-9), 2),
        "damaged": {"stored_tiles": [asdict(t) for t in sorted(damaged)],
                    "left_out": [[int(rows[i]), int(cols[i])] for i in sorted(left_out)]},  # grid (row, col), NaN
        "config": asdict(cfg), "files": {"csv": csv_path.name, "map": map_path.name, "heatmap": heat_path.name},
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    log.info("%s: %d tiles in %.1f s (%.1f tiles/s) -> %s", path.name, predicted_n, seconds,
             predicted_n / max(seconds, 1e-9), out)
    if damaged:
        log.warning("%s: %d damaged stored tiles; %d tissue tiles over them left out", path.name, len(damaged),
                    len(left_out))
    return SlideResult(path, predicted_n, seconds, csv_path, map_path, heat_path, meta_path, sorted(damaged),
                       len(left_out), counts, prob_sum)
