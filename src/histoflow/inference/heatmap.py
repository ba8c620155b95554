"""What a slide's maps share, whoever draws them (deployment/slide_map.py: class probabilities; attention_maps:
a bag head's attention): the name of each slide's outputs, and the heatmap over its thumbnail, as a PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from histoflow.slides.tiles import TileGeometry

DPI = 120


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """The name of each slide's outputs (slides/<name>.tiles.csv ..., slides.csv's `output`): its file's name without
    suffix; in the order listed, a slide whose name an earlier slide took (a/s1.svs, b/s1.svs; or S1.svs and s1.svs,
    one file on a disk blind to case) gets `-2` after it, `-3`..., the first that no other slide has as its own: a/s1,
    b/s1, c/s1-2.svs are named s1, s1-3, s1-2. docs/prediction.md states the rule."""
    own = {p.stem.casefold() for p in paths}
    taken: set[str] = set()
    names: dict[Path, str] = {}
    for path in paths:
        name, n = path.stem, 1
        while name.casefold() in taken or (n > 1 and name.casefold() in own):
            n += 1
            name = f"{path.stem}-{n}"
        taken.add(name.casefold())
        names[path] = name
    return names


def save_heatmap(thumbnail: np.ndarray, probability: np.ndarray, geometry: TileGeometry, level0_size: tuple[int, int],
                 path: str | Path, title: str = "", max_cells: int = 2048, label: str = "probability") -> Path:
    """Draw `probability` (rows, cols; NaN without tissue) of the tile grid over `thumbnail`; write `path`."""
    # a grid finer than the thumbnail shows nothing more: keep every step-th cell, so the figure stays small
    step = max(1, math.ceil(max(probability.shape) / max_cells))
    cells = np.asarray(probability[::step, ::step], np.float32)
    th, tw = thumbnail.shape[:2]
    w0, h0 = level0_size
    # grid cell (r, c) covers level pixels [c*stride, (c+1)*stride): its extent in thumbnail pixels
    cell = geometry.read_stride * geometry.downsample * step
    right, bottom = cells.shape[1] * cell * tw / w0, cells.shape[0] * cell * th / h0
    fig = Figure(figsize=(8, 8 * th / tw + 0.6))
    ax = fig.add_subplot()
    ax.imshow(thumbnail, extent=(0, tw, th, 0))
    image = ax.imshow(np.ma.masked_invalid(cells), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6,
                      extent=(0, right, bottom, 0), interpolation="nearest")
    ax.set_xlim(0, tw)
    ax.set_ylim(th, 0)
    ax.set_axis_off()
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path
