"""histoflow view in a real browser (headless Chromium over the DevTools protocol): a slide's page, served by a
`histoflow view` the test starts and exported to disk, draws the slide's tissue and the heatmap where the run's map
says, and logs no script error. HISTOFLOW_SCREENSHOT=<png> also writes the served page's screenshot there (the
README's figure: HISTOFLOW_SCREENSHOT=docs/figures/viewer.png). On the served page the pointer, moved over tiles as a
mouse moves, reads each tile's probabilities from the run's map; the opacity slider and the class picker redraw the
overlay as the map says."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from headless_chromium import CHROMIUM, MISSING, PageResult, Step, open_page
from PIL import Image
from test_view import REPO, start_view
from view_run import CLASSES, HEIGHT, TILE, TISSUE, WIDTH, make_run, tumour_probability

from histoflow.viewer.overlays import colour

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)
READY = "document.body.dataset.ready && document.body.dataset.imageRect"
VALUES = {"rect": "document.body.dataset.imageRect", "overlay": "document.body.dataset.ready",
          "errors": "document.body.dataset.errors || ''",
          "navigator": "(r => [r.left, r.top, r.right, r.bottom])(document.querySelector('.navigator')"
                       ".getBoundingClientRect())"}
OPACITY = 0.5  # the page's default
BACKGROUND = (0x33, 0x33, 0x33)  # the viewer's, around the slide
TOLERANCE = 20  # JPEG tiles and resampling


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_run(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def served(run: tuple[Path, Path]) -> Iterator[str]:
    process = start_view(run[0])
    try:
        yield "http://{}:{}/".format(*process.address)
    finally:
        process.terminate()
        process.wait(30)


def expected_colours() -> dict[str, np.ndarray]:
    """What each kind of grid cell should look like: glass white, tissue under the overlay blended with its colour."""
    tum = tumour_probability()
    high, low = (float(tum[0, 0]), float(tum[-1, 0]))
    blend = {name: OPACITY * colour(np.array([p]))[0, :3] + (1 - OPACITY) * TISSUE
             for name, p in (("high", high), ("low", low))}
    return {"glass": np.array([255, 255, 255]), **blend}


def cell_centre(values: dict, row: int, col: int) -> tuple[int, int] | None:
    """Where grid cell (row, col)'s centre is in the window, None where it is hidden (under the header, off screen,
    under the navigator)."""
    left, top, right, _ = (float(v) for v in values["rect"].split(","))
    scale = (right - left) / WIDTH
    x, y = (int(left + (col + 0.5) * TILE * scale), int(top + (row + 0.5) * TILE * scale))
    nav = values["navigator"]
    if y + 4 >= 700 or y - 4 < 45 or (nav[0] - 5 < x < nav[2] + 5 and nav[1] - 5 < y < nav[3] + 5):
        return None
    return x, y


def check_cells(png: bytes, values: dict, expected: Callable[[int, int], np.ndarray]) -> int:
    """Each visible grid cell's centre has the colour `expected(row, col)`; the number of cells checked."""
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)
    tum, checked = tumour_probability(), 0
    for row in range(tum.shape[0]):
        for col in range(tum.shape[1]):
            centre = cell_centre(values, row, col)
            if centre is None:
                continue
            x, y = centre
            seen, wanted = shot[y - 4:y + 5, x - 4:x + 5].reshape(-1, 3).mean(0), expected(row, col)
            assert np.abs(seen - wanted).max() < TOLERANCE, (row, col, seen, wanted)
            checked += 1
    return checked


def check_page(result: PageResult) -> None:
    """The slide fills the rectangle the page reports; each grid cell's centre has its expected colour."""
    assert result.errors == [] and result.values["errors"] == "", (result.errors, result.values["errors"])
    assert result.values["overlay"] == "prob_TUM"  # the run's heatmap class, chosen by default
    shot = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB")).astype(np.float64)
    left, top, right, bottom = (float(v) for v in result.values["rect"].split(","))
    scale = (right - left) / WIDTH
    assert scale > 0.2 and abs((bottom - top) / HEIGHT - scale) < 0.01
    tum, colours = tumour_probability(), expected_colours()

    def kinds(row: int, col: int) -> str:
        return "glass" if np.isnan(tum[row, col]) else "high" if tum[row, col] > 0.5 else "low"

    assert check_cells(result.png, result.values, lambda row, col: colours[kinds(row, col)]) > 10
    if left > 10:  # beside the slide: the viewer's background, so the slide was drawn, not a blank page
        assert np.abs(shot[int((top + bottom) / 2), int(left / 2)] - BACKGROUND).max() < 4


def test_a_served_slide_shows_tissue_and_heatmap(served: str) -> None:
    result = open_page(served + "slides/synthetic.html", READY, VALUES)
    wanted = os.environ.get("HISTOFLOW_SCREENSHOT")
    if wanted:
        Path(wanted).write_bytes(result.png)
    check_page(result)
    index = open_page(served, "document.querySelector('table.sortable tbody tr') !== null",
                      {"errors": "document.body.dataset.errors || ''"})
    assert index.errors == [] and index.values["errors"] == ""


def test_an_exported_slide_opens_from_disk(run: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "histoflow", "view", str(run[0]), "--export", str(out),
                           "view.progress=false"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "slides" / "synthetic_files" / "11" / "7_5.jpeg").is_file() and (out / "index.html").is_file()
    check_page(open_page((out / "slides" / "synthetic.html").as_uri(), READY, VALUES))


READOUT = "document.getElementById('readout').textContent"


def test_pointer_readout_opacity_and_class_picker(served: str) -> None:
    """The pointer over a tissue tile of each kind and over glass reads the run's probabilities of the tile under it;
    opacity 1 shows the map's colour alone, the class picker P(NORM) the other channel's, opacity 0 the tissue."""
    tum = tumour_probability()
    prob = {"TUM": tum, "NORM": 1 - tum}
    cells = {"high": (1, 1), "low": (tum.shape[0] - 2, 1), "glass": (1, tum.shape[1] - 3)}
    pointer = [Step(f"(t => t.startsWith('x ') && t)({READOUT})", {"readout": READOUT},
                    pointer=lambda values, cell=cell: cell_centre(values, *cell)) for cell in cells.values()]
    redraws = [Step("document.body.dataset.opacity === '1'", VALUES, script=_set("opacity", "1", "input")),
               Step("document.body.dataset.ready === 'prob_NORM'", VALUES,
                    script=_set("overlay", "prob_NORM", "change")),
               Step("document.body.dataset.opacity === '0'", VALUES, script=_set("opacity", "0", "input"))]
    result = open_page(served + "slides/synthetic.html", READY, VALUES, steps=[*pointer, *redraws])
    assert all(cell_centre(result.values, *cell) for cell in cells.values())  # each pointed cell in view
    for (kind, (row, col)), step in zip(cells.items(), result.steps):
        text = step.values["readout"]
        x, y = (int(v) for v in re.fullmatch(r"x (-?\d+) y (-?\d+).*", text).groups())
        assert (y // TILE, x // TILE) == (row, col), (kind, text)  # the level-0 point is in the cell pointed at
        if kind == "glass":
            assert ":" not in text, text  # no tile there: no values
        else:
            values = ", ".join(f"P({c}) {float(prob[c][row, col]):.3f}" for c in CLASSES)
            assert text.endswith(": " + values), (kind, text, values)
    opaque_tum, opaque_norm, transparent = result.steps[len(cells):]
    glass = np.array([255, 255, 255])
    for step, channel in ((opaque_tum, "TUM"), (opaque_norm, "NORM")):
        assert step.values["overlay"] == f"prob_{channel}" and step.values["errors"] == ""
        assert check_cells(step.png, step.values, lambda r, c, p=prob[channel]: glass if np.isnan(p[r, c]) else
                           colour(np.array([p[r, c]]))[0, :3]) > 10
    assert check_cells(transparent.png, transparent.values,
                       lambda r, c: glass if np.isnan(tum[r, c]) else TISSUE) > 10
    assert result.errors == []


def _set(element: str, value: str, event: str) -> str:
    """A script setting the page's control `element` to `value` as a user would: the value, then its event."""
    return (f"(e => {{ e.value = '{value}'; e.dispatchEvent(new Event('{event}')); }})"
            f"(document.getElementById('{element}'))")
