"""A slide's maps as the viewer draws them: one RGBA image per class (or attention) at the map's grid resolution,
one pixel per tile, transparent without a tile, laid over the slide at the grid's level-0 extent; and the grid's
values for the page, to show a tile's probabilities and attention under the pointer.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from histoflow.viewer.run_folder import SlideEntry, SlideMap

COLORMAP = "turbo"  # 0 blue -> 1 red: perceptually ordered, distinct from H&E's pinks and purples


def colour(values: np.ndarray) -> np.ndarray:
    """(..., 4) uint8 RGBA of values in [0, 1]; NaN transparent."""
    v = np.asarray(values, np.float64)
    rgba = (colormaps[COLORMAP](np.nan_to_num(np.clip(v, 0, 1), nan=0.0)) * 255).round().astype(np.uint8)
    rgba[..., 3] = np.where(np.isnan(v), 0, 255)
    return rgba


def overlay_key(slide_map: SlideMap, channel: str) -> str:
    return "attention" if slide_map.kind == "attention" else f"prob_{channel}"


def overlay_png(slide_map: SlideMap, channel: str) -> bytes:
    """The PNG of one channel of a map (one pixel per grid cell)."""
    grid = np.asarray(slide_map.grid()[..., slide_map.channels.index(channel)], np.float32)
    buffer = io.BytesIO()
    Image.fromarray(colour(grid), "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def overlays(entry: SlideEntry) -> dict[str, tuple[SlideMap, str]]:
    """The slide's overlays by key (prob_<class>, attention): what the page's picker offers."""
    return {overlay_key(m, c): (m, c) for m in entry.maps for c in m.channels}


def _extent(slide_map: SlideMap) -> dict[str, float]:
    """Where the grid lies in level-0 pixels: cell (row, col) starts at (col, row) x step; a tile is `side` wide."""
    g = slide_map.geometry
    step, side = g["read_stride"] * g["downsample"], g["read_size"] * g["downsample"]
    return {"step": step, "side": side, "rows": g["rows"], "cols": g["cols"],
            "width": (g["cols"] - 1) * step + side, "height": (g["rows"] - 1) * step + side}


def _values(slide_map: SlideMap) -> list:
    grid = np.asarray(slide_map.grid(), np.float32)
    return [[[None if math.isnan(v) else round(float(v), 4) for v in cell] for cell in row] for row in grid]


def slide_data(entry: SlideEntry, dzi: dict[str, Any], name_url: str) -> dict[str, Any]:
    """What a slide's page needs: its DZI, its overlays (key, label, image, extent) and the maps' values."""
    maps = []
    for m in entry.maps:
        maps.append({"kind": m.kind, "channels": m.channels, "extent": _extent(m), "values": _values(m)})
    return {"name": entry.name, "dzi": dzi, "tiles": f"{name_url}_files/", "maps": maps,
            "overlays": [{"key": overlay_key(m, c), "map": i, "channel": j,
                          "label": "attention" if m.kind == "attention" else f"P({c})",
                          "url": f"{name_url}.{overlay_key(m, c)}.png"}
                         for i, m in enumerate(entry.maps) for j, c in enumerate(m.channels)],
            "default": _default_overlay(entry)}


def _default_overlay(entry: SlideEntry) -> str:
    for m in entry.maps:
        if m.kind == "probabilities":
            wanted = m.meta.get("heatmap_class")
            return overlay_key(m, wanted if wanted in m.channels else m.channels[-1])
    return "attention" if entry.maps else ""


def slide_script(data: dict[str, Any]) -> str:
    """The slide's data as a script (not fetched JSON: pages opened from file:// cannot fetch)."""
    return f"window.HISTOFLOW_SLIDE = {json.dumps(data, separators=(',', ':'))};\n"
