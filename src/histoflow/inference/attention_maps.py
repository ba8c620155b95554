"""Where a bag head looked: its attention over each held-out image or slide, in the format of the slide maps
(deployment/slide_map.py), and the tiles it attended to most and least (the report's gallery).

    <report>/attention_maps/<stem>.tiles.csv    x, y (level-0 tile origin), row, col (grid cell), attention (the
                                                tile's weight in its bag, summed over a window's rotations),
                                                relative (attention x the bag's windows: 1 is a mean's weight)
    <report>/attention_maps/<stem>.map.npy      float32 (rows, cols, 1): attention / the bag's largest, NaN elsewhere
    <report>/attention_maps/<stem>.heatmap.png  that map over the image or the slide's thumbnail
    <report>/attention_maps/<stem>.json         geometry, bag, true and predicted class, fold

A survival or regression head (task=survival|regression) has no class: its maps are the same attention, the bag's
"label" is its target (time and event, or the number) and its "predicted" its group, by which the gallery is drawn:
the predicted high- or low-risk half (cut at each fold's median risk, as the report's Kaplan-Meier halves), or the
quartile of the predicted value (pooled over folds).

Each source (an image of the prepared data, or a slide of a cohort) is held out by one fold, so every map comes
from the model that never saw it. A patient bag spreads its attention over its slides: each slide's map shows its
share, scaled by the bag's largest weight, so a patient's maps compare.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from histoflow.data.images import read_rgb
from histoflow.evaluation.survival import risk_halves
from histoflow.features.slide_features import slide_features_meta
from histoflow.inference.heatmap import output_names, save_heatmap
from histoflow.slides.backend import open_slide
from histoflow.slides.tiles import TileGeometry
from histoflow.training.bag_outputs import ATTENTION, read_bag_predictions

MAPS = "attention_maps"
GALLERY = "attention_gallery.png"
RISK_HALVES = ("high risk", "low risk")  # a survival head's gallery rows
QUARTILES = tuple(f"value Q{k}" for k in (4, 3, 2, 1))  # a regression head's: the predicted value's quartiles


@dataclass(frozen=True)
class AttendedTile:
    """A held-out tile (a window, its rotations taken together) with its weight in its bag."""

    bag: str
    label: str
    predicted: str
    fold: str
    source: str  # the source index (bags.json's sources)
    x: int
    y: int
    attention: float
    relative: float  # attention x the number of windows in the bag: 1 is the weight of a mean


def task_groups(rows: Sequence[Mapping[str, Any]], task: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Each row of a survival or regression head as (its target in words, its predicted group): the risk half of its
    fold (RISK_HALVES), or the quartile of the predicted value over all rows (QUARTILES)."""
    if task["name"] == "survival":
        high = risk_halves([float(r["risk"]) for r in rows], [str(r["fold"]) for r in rows])
        return [((f"time {float(r['time']):g}, event {int(float(r['event']))}; " if r.get("time") else "")
                 + f"risk {float(r['risk']):.3g}", RISK_HALVES[0] if h else RISK_HALVES[1]) for r, h in zip(rows, high)]
    values = np.array([float(r["predicted"]) for r in rows])
    cuts = np.quantile(values, [0.25, 0.5, 0.75]) if len(values) else []
    return [((f"target {float(r['target']):g}; " if r.get("target") else "") + f"predicted {v:.3g}",
             f"value Q{int(np.searchsorted(cuts, v)) + 1}") for r, v in zip(rows, values)]


def attended_tiles(runs: Sequence[Path]) -> tuple[list[AttendedTile], dict[str, dict[str, Any]]]:
    """Every held-out window of the runs with its attention (rotations of a window summed), and the sources."""
    tiles: list[AttendedTile] = []
    sources: dict[str, dict[str, Any]] = {}
    read = [read_bag_predictions(run) for run in runs]
    task = read[0][1].get("task") if read else None
    named = iter(task_groups([r for rows, _ in read for r in rows], task) if task else [])
    for run, (rows, record) in zip(runs, read):
        sources.update(record.get("sources") or {})
        with np.load(run / ATTENTION) as z:
            for i, row in enumerate(rows):
                weights: dict[tuple[str, int, int], float] = {}
                for w, c in zip(z[f"attention_{i}"], z[f"coords_{i}"]):
                    key = (str(int(c[0])), int(c[1]), int(c[2]))
                    weights[key] = weights.get(key, 0.0) + float(w)
                label, predicted = next(named) if task else (row["label"], row["predicted"])
                tiles += [AttendedTile(row["image"], label, predicted, str(row["fold"]), s, x, y, w,
                                       w * len(weights)) for (s, x, y), w in weights.items()]
    return tiles, sources


class TileSource:
    """An image or a slide whose tiles a bag holds: its tile geometry, level-0 size, a picture of it whole and
    each tile's pixels. info: a bags.json source ({"path", "side", "stride"} of an image, {"path", "shard"} of a
    slide)."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.path = Path(info["path"])
        self._slide = None
        if "shard" in info:  # a slide: the geometry its shard was tiled with
            meta = slide_features_meta(Path(info["shard"]))
            self.geometry = TileGeometry(**meta["geometry"])
            self.size: tuple[int, int] = tuple(meta["dimensions"])  # type: ignore[assignment]
            self._pixels = None
        else:
            self._pixels = read_rgb(self.path)[0]
            h, w = self._pixels.shape[:2]
            side, stride = int(info["side"]), int(info.get("stride") or info["side"])
            self.geometry = TileGeometry(0, 1.0, side, stride, side, (h - side) // stride + 1, (w - side) // stride + 1)
            self.size = (w, h)

    def _open(self) -> Any:
        if self._slide is None:
            self._slide = open_slide(self.path)
        return self._slide

    def picture(self, max_size: int = 1024) -> np.ndarray:
        """The image itself, or the slide's thumbnail."""
        return self._pixels if self._pixels is not None else self._open().thumbnail(max_size)

    def tile(self, x: int, y: int) -> np.ndarray:
        """The tile at level-0 (x, y) as the encoder saw it before resizing (rotation 0)."""
        g = self.geometry
        if self._pixels is not None:
            return self._pixels[y:y + g.read_size, x:x + g.read_size]
        return self._open().read_region((x, y), g.level, (g.read_size, g.read_size))

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()


def _by_source(tiles: Sequence[AttendedTile]) -> dict[str, list[AttendedTile]]:
    out: dict[str, list[AttendedTile]] = {}
    for t in tiles:
        out.setdefault(t.source, []).append(t)
    return out


def write_attention_maps(runs: Sequence[Path], out: Path, names: Mapping[Path, str] | None = None) -> list[Path]:
    """A map of attention over every held-out image or slide of the runs in out/attention_maps/<name>.*; the PNGs.
    `names`: each source's outputs' name where the caller named them already (a deployment's slides.csv `output`:
    a slide's probability and attention maps must share it); by default inference.heatmap.output_names in the
    order the runs list their sources."""
    tiles, sources = attended_tiles(runs)
    largest: dict[str, float] = {}
    for t in tiles:
        largest[t.bag] = max(largest.get(t.bag, 0.0), t.attention)
    folder = out / MAPS
    folder.mkdir(parents=True, exist_ok=True)
    by_source = _by_source(tiles)
    if names is None:
        names = output_names([Path(sources[s]["path"]) for s in by_source])
    pngs = []
    for index, members in by_source.items():
        source = TileSource(sources[index])
        try:
            stem = folder / names[source.path]
            pngs.append(_write_map(source, members, largest[members[0].bag], stem))
        finally:
            source.close()
    return pngs


def _write_map(source: TileSource, tiles: Sequence[AttendedTile], largest: float, stem: Path) -> Path:
    g = source.geometry
    origins = np.array([(t.x, t.y) for t in tiles], dtype=np.int64)
    rows, cols = g.grid_index(origins)
    grid = np.full((g.rows, g.cols, 1), np.nan, dtype=np.float32)
    shown = np.array([t.attention for t in tiles]) / max(largest, 1e-12)
    grid[rows, cols, 0] = shown
    np.save(stem.with_name(stem.name + ".map.npy"), grid)
    with stem.with_name(stem.name + ".tiles.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "row", "col", "attention", "relative"])
        writer.writerows([t.x, t.y, int(r), int(c), f"{t.attention:.6g}", f"{t.relative:.4f}"]
                         for t, r, c in zip(tiles, rows, cols))
    first = tiles[0]
    stem.with_name(stem.name + ".json").write_text(json.dumps({
        "source": str(source.path), "bag": first.bag, "label": first.label, "predicted": first.predicted,
        "fold": first.fold, "tiles": len(tiles), "geometry": asdict(g), "level0_size": list(source.size),
        "scale": "attention / the largest weight in the bag"}, indent=1))
    title = (f"{Path(first.bag).name}: {first.label}, predicted {first.predicted} (fold {first.fold}); "
             "attention / bag's largest")
    return save_heatmap(source.picture(), grid[..., 0], g, source.size, stem.with_name(stem.name + ".heatmap.png"),
                        title, label="attention (1: the bag's most attended tile)")


def attention_gallery(runs: Sequence[Path], classes: Sequence[str], png: Path, k: int = 6, by: str = "label",
                      rows_are: str | None = None) -> Path:
    """A PNG of the k most and k least attended held-out windows of each true class (attention relative to a
    mean's 1/N), each as it lies in its image or slide; by="predicted": of each predicted class (new slides without
    labels), or of a survival or regression head's predicted group (classes: RISK_HALVES or QUARTILES; rows_are
    names them in the title)."""
    tiles, sources = attended_tiles(runs)
    held_out = [name for name in classes if any(getattr(t, by) == name for t in tiles)]  # a class left out: no row
    fig = Figure(figsize=(1.6 * k, 1.75 * 2 * max(1, len(held_out))))
    axes = fig.subplots(2 * max(1, len(held_out)), k, squeeze=False)
    opened: dict[str, TileSource] = {}
    try:
        for c, name in enumerate(held_out):
            ranked = sorted((t for t in tiles if getattr(t, by) == name), key=lambda t: -t.relative)
            for r, (which, chosen) in enumerate((("most", ranked[:k]), ("least", ranked[::-1][:k]))):
                for j, ax in enumerate(axes[2 * c + r]):
                    ax.set_xticks([]), ax.set_yticks([])
                    if j >= len(chosen):
                        ax.axis("off")
                        continue
                    t = chosen[j]
                    if t.source not in opened:
                        opened[t.source] = TileSource(sources[t.source])
                    ax.imshow(opened[t.source].tile(t.x, t.y))
                    ax.set_title(f"{t.relative:.2f}x", fontsize=7)
                    if j == 0:
                        ax.set_ylabel(f"{name}\n{which}", fontsize=8)
    finally:
        for source in opened.values():
            source.close()
    if not held_out:
        for ax in axes.flat:
            ax.axis("off")
    missing = ", ".join(sorted(set(classes) - set(held_out)))
    rows_are = rows_are or ("true class" if by == "label" else "predicted class")
    fig.suptitle(f"{'New' if by == 'predicted' and rows_are == 'predicted class' else 'Held-out'} windows by attention "
                 f"(x: relative to a mean's 1/N), most and least per {rows_are}"
                 + (f"\nno held-out tile of {missing}" if missing else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return png


def iter_maps(folder: Path, limit: int) -> Iterator[tuple[str, Path]]:
    """Up to `limit` heatmaps of a report's attention maps, by name: what goes to the dashboard."""
    for png in sorted((folder / MAPS).glob("*.heatmap.png"))[:limit]:
        yield png.name.removesuffix(".heatmap.png"), png
