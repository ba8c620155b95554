"""The viewer's site: every path it serves and what is there, the same for the server and the static export.

    index.html                           the slides list (sortable)
    report/index.html, report/<file>     the run's report.md as a page, and the files beside it (figures, CSVs)
    slides/<name>.html                   a slide in OpenSeadragon
    slides/<name>.js                     its DZI, overlays and map values (a script: pages work from file://)
    slides/<name>.dzi                    the DZI description (for other deep-zoom clients)
    slides/<name>_files/<L>/<c>_<r>.jpeg its deep-zoom tiles
    slides/<name>.<overlay>.png          an overlay: prob_<class> or attention, one pixel per tile
    slides/<name>.geojson                its tiles for QuPath (deployment/geojson.py)
    static/...                           OpenSeadragon (its licence in static/openseadragon/LICENSE.txt), scripts

Nothing else is served: report files only from the report's folder, never from above it.
"""

from __future__ import annotations

import json
import mimetypes
import re
import threading
from pathlib import Path
from typing import Iterator

from histoflow.deployment.geojson import tiles_feature_collection
from histoflow.slides.backend import DEFAULT_BACKEND, open_slide
from histoflow.viewer.deepzoom import DeepZoom
from histoflow.viewer.overlays import overlay_png, overlays, slide_data, slide_script
from histoflow.viewer.pages import index_page, report_page, slide_page
from histoflow.viewer.run_folder import RunFolder, SlideEntry

STATIC = Path(__file__).resolve().parent / "static"
REPORT_FILES = (".png", ".svg", ".csv", ".json", ".md", ".txt")
_TILE = re.compile(r"(?P<name>.+)_files/(?P<level>\d+)/(?P<col>\d+)_(?P<row>\d+)\.(?:jpeg|png)")
_OVERLAY = re.compile(r"(?P<name>.+)\.(?P<key>prob_.+|attention)\.png")


def content_type(path: str) -> str:
    kind = {".js": "text/javascript", ".dzi": "application/xml", ".geojson": "application/geo+json",
            ".md": "text/markdown"}.get(Path(path).suffix)
    return kind or mimetypes.guess_type(path)[0] or "application/octet-stream"


def inside(base: Path, relative: str) -> Path | None:
    """The file `relative` names under `base`, or None where it is not a file there (.., links or absolute paths
    leading out of it included)."""
    if "\\" in relative or "\0" in relative or relative.startswith("/") or ".." in relative.split("/"):
        return None
    base = base.resolve()
    target = (base / relative).resolve()
    return target if target.is_file() and target.is_relative_to(base) else None


class Site:
    """The run's pages, tiles and files by path; slides are opened on first use and kept open."""

    def __init__(self, run: RunFolder, backend: str = DEFAULT_BACKEND, source_mpp: float | None = None,
                 cache_bytes: int = 256 << 20) -> None:
        self.run, self.backend, self.source_mpp, self.cache_bytes = run, backend, source_mpp, cache_bytes
        self._zooms: dict[str, DeepZoom] = {}
        self._lock = threading.Lock()

    def zoom(self, entry: SlideEntry) -> DeepZoom:
        with self._lock:
            if entry.name not in self._zooms:
                slide = open_slide(entry.path, self.backend, self.source_mpp)
                self._zooms[entry.name] = DeepZoom(slide, cache_bytes=self.cache_bytes)
            return self._zooms[entry.name]

    def close(self) -> None:
        for zoom in self._zooms.values():
            zoom.slide.close()
        self._zooms.clear()

    def get(self, path: str) -> bytes | None:
        """What is at `path` (relative, no leading slash), or None: the server answers 404."""
        path = path or "index.html"
        if path == "index.html":
            return index_page(self.run).encode()
        if path.startswith("report/"):
            return self._report(path.removeprefix("report/"))
        if path.startswith("static/"):
            found = inside(STATIC, path.removeprefix("static/"))
            return found.read_bytes() if found else None
        if path.startswith("slides/"):
            return self._slide(path.removeprefix("slides/"))
        return None

    def _report(self, rest: str) -> bytes | None:
        if self.run.report_dir is None:
            return None
        if rest in ("", "index.html"):
            return report_page(self.run).encode()
        found = inside(self.run.report_dir, rest)
        return found.read_bytes() if found and found.suffix in REPORT_FILES and found.parent == \
            self.run.report_dir.resolve() else None

    def _slide(self, rest: str) -> bytes | None:
        tile = _TILE.fullmatch(rest)
        if tile:
            entry = self.run.slides.get(tile["name"])
            if entry is None:
                return None
            try:
                return self.zoom(entry).tile(int(tile["level"]), int(tile["col"]), int(tile["row"]))
            except ValueError:  # a tile the pyramid lacks
                return None
        overlay = _OVERLAY.fullmatch(rest)
        if overlay and overlay["name"] in self.run.slides:
            found = overlays(self.run.slides[overlay["name"]]).get(overlay["key"])
            return overlay_png(*found) if found else None
        name, _, suffix = rest.rpartition(".")
        entry = self.run.slides.get(name)
        if entry is None:
            return None
        if suffix == "html":
            return slide_page(entry).encode()
        if suffix == "js":
            return slide_script(slide_data(entry, self.zoom(entry).dzi(), entry.name)).encode()
        if suffix == "dzi":
            return self.zoom(entry).dzi_xml().encode()
        if suffix == "geojson":
            maps = [(m.tiles_csv, m.geometry) for m in entry.maps]
            return json.dumps(tiles_feature_collection(maps)).encode()
        return None

    def paths(self) -> Iterator[str]:
        """Every path of the site: what an export writes."""
        yield "index.html"
        if self.run.report_dir is not None:
            yield "report/index.html"
            yield from (f"report/{p.name}" for p in sorted(self.run.report_dir.iterdir())
                        if p.is_file() and p.suffix in REPORT_FILES)
        yield from (f"static/{p.relative_to(STATIC).as_posix()}" for p in sorted(STATIC.rglob("*")) if p.is_file())
        for entry in self.run.slides.values():
            base = f"slides/{entry.name}"
            yield from (f"{base}.{suffix}" for suffix in ("html", "js", "dzi", "geojson"))
            yield from (f"{base}.{key}.png" for key in overlays(entry))
            zoom = self.zoom(entry)
            yield from (f"{base}_files/{level}/{col}_{row}.{zoom.format}" for level, col, row in zoom.tiles())
