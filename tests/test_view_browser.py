"""histoflow view in a real browser (headless Chromium over the DevTools protocol): a slide's page, served by a
`histoflow view` the test starts and exported to disk, draws the slide's tissue and the heatmap where the run's map
says, and logs no script error. HISTOFLOW_SCREENSHOT=<png> also writes the served page's screenshot there (the
README's figure: HISTOFLOW_SCREENSHOT=docs/figures/viewer.png)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from headless_chromium import CHROMIUM, MISSING, PageResult, open_page
from PIL import Image
from test_view import REPO, start_view
from view_run import HEIGHT, TILE, TISSUE, WIDTH, make_run, tumour_probability

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


def check_page(result: PageResult) -> None:
    """The slide fills the rectangle the page reports; each grid cell's centre has its expected colour."""
    assert result.errors == [] and result.values["errors"] == "", (result.errors, result.values["errors"])
    assert result.values["overlay"] == "prob_TUM"  # the run's heatmap class, chosen by default
    shot = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB")).astype(np.float64)
    left, top, right, bottom = (float(v) for v in result.values["rect"].split(","))
    scale = (right - left) / WIDTH
    assert scale > 0.2 and abs((bottom - top) / HEIGHT - scale) < 0.01
    tum, colours = tumour_probability(), expected_colours()
    for row in range(tum.shape[0]):
        for col in range(tum.shape[1]):
            x, y = (int(left + (col + 0.5) * TILE * scale), int(top + (row + 0.5) * TILE * scale))
            nav = result.values["navigator"]
            if y + 4 >= shot.shape[0] or y - 4 < 45 or (nav[0] - 5 < x < nav[2] + 5 and nav[1] - 5 < y < nav[3] + 5):
                continue  # under the header, off screen or under the navigator
            seen = shot[y - 4:y + 5, x - 4:x + 5].reshape(-1, 3).mean(0)
            kind = "glass" if np.isnan(tum[row, col]) else "high" if tum[row, col] > 0.5 else "low"
            assert np.abs(seen - colours[kind]).max() < TOLERANCE, (row, col, kind, seen, colours[kind])
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
