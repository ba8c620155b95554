"""histoflow view without a browser: deep-zoom tiles are the slide's pixels, the run folder is read as written, the
GeoJSON for QuPath, bad input named, and nothing outside the run served (over real HTTP)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from view_run import CLASSES, HEIGHT, TILE, WIDTH, make_run, slide_pixels

from histoflow.commands.view import hydra_arguments
from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.deployment.geojson import tiles_feature_collection, write_tiles_geojson
from histoflow.deployment.slide_map import SlideConfig
from histoflow.slides.backend import open_slide
from histoflow.viewer.deepzoom import DeepZoom
from histoflow.viewer.run_folder import read_run
from histoflow.viewer.server import LOCAL, bind
from histoflow.viewer.site import Site

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_run(tmp_path_factory.mktemp("view"))


def test_deep_zoom_tiles_are_the_slides_regions(run: tuple[Path, Path]) -> None:
    """At a deep-zoom level that is a slide level, a tile (its 1-px overlap included) is read_region's pixels."""
    _, path = run
    base = slide_pixels()
    with open_slide(path, "tifffile") as slide:
        zoom = DeepZoom(slide)
        top = zoom.level_count - 1
        assert zoom.level_dimensions[top] == (WIDTH, HEIGHT) and zoom.level_dimensions[0] == (1, 1)
        for level, slide_level in ((top, 0), (top - 2, 2)):  # downsample 1 and 4: slide levels 0 and 2
            for col, row in ((0, 0), (1, 1), (zoom.level_tiles[level][0] - 1, zoom.level_tiles[level][1] - 1)):
                read = zoom.tile_read(level, col, row)
                assert read.level == slide_level and read.size == read.out
                tile = zoom.tile_pixels(level, col, row)
                np.testing.assert_array_equal(tile, slide.read_region(read.location, slide_level, read.size))
        # and the file's own pixels: tile (1, 1) of full resolution starts 1 px before 254, 254
        np.testing.assert_array_equal(zoom.tile_pixels(top, 1, 1), base[253:253 + 256, 253:253 + 256])
        assert zoom.tile_read(top - 1, 0, 0).out == (255, 255)  # a level between slide levels: resized
        with pytest.raises(ValueError, match="level has"):
            zoom.tile_read(top, 99, 0)


def test_the_run_is_read_as_written(run: tuple[Path, Path]) -> None:
    folder, path = run
    read = read_run(folder)
    entry = read.slides["synthetic"]
    assert entry.path == path and entry.row["patient"] == "P1" and entry.row["prediction"] in CLASSES
    assert [m.channels for m in entry.maps] == [CLASSES]
    site = Site(read)
    try:
        paths = list(site.paths())
        assert "slides/synthetic_files/11/7_5.jpeg" in paths and "slides/synthetic.prob_TUM.png" in paths
        assert b"synthetic.html" in site.get("index.html") and b"<table" in site.get("report/index.html")
    finally:
        site.close()


def test_geojson_tiles_for_qupath(run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = run
    entry = read_run(folder).slides["synthetic"]
    collection = tiles_feature_collection([(m.tiles_csv, m.geometry) for m in entry.maps])
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and len(features) == 24  # the tissue half of the 6 x 8 grid
    first = features[0]
    (x, y), (x2, y2) = first["geometry"]["coordinates"][0][0], first["geometry"]["coordinates"][0][2]
    assert (x2 - x, y2 - y) == (TILE, TILE)  # level-0 pixels
    props = first["properties"]
    assert props["objectType"] == "tile" and set(props["measurements"]) == {f"prob_{c}" for c in CLASSES}
    assert props["classification"]["name"] == ("TUM" if y < HEIGHT // 2 else "NORM")
    written = write_tiles_geojson(entry.maps[0].tiles_csv, entry.maps[0].meta, tmp_path / "s.geojson")  # predict's
    assert json.loads(written.read_text()) == collection


def test_predict_takes_slide_export() -> None:
    assert SlideConfig.from_config({"export": ["geojson"]}).export == ["geojson"]
    with pytest.raises(ConfigError, match="slide.export"):
        SlideConfig.from_config({"export": 3})


def test_bad_input_is_named(run: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="not a run's output.*Expected a prediction's output"):
        read_run(tmp_path)
    folder, path = run
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / path.name).write_bytes(path.read_bytes())
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    meta = copy / "slides" / "synthetic.json"
    meta.write_text(meta.read_text().replace(str(path), str(tmp_path / "gone" / path.name)))
    with pytest.raises(MissingInputError, match="view.slides_root="):
        read_run(copy)
    assert read_run(copy, moved).slides["synthetic"].path == moved / path.name
    taken = bind(LOCAL, None)
    try:
        with pytest.raises(ConfigError, match=f"view.port={taken.getsockname()[1]}: the port is in use"):
            bind(LOCAL, taken.getsockname()[1])
    finally:
        taken.close()


def test_arguments() -> None:
    assert hydra_arguments(["runs/a", "--export", "out", "view.port=9"]) == ["folder=runs/a", "view.export=out",
                                                                            "view.port=9"]


@pytest.fixture(scope="module")
def server(run: tuple[Path, Path]) -> Iterator[tuple[str, int]]:
    process = start_view(run[0])
    try:
        yield process.address
    finally:
        process.terminate()
        process.wait(30)


class ViewProcess(subprocess.Popen):
    address: tuple[str, int]


def start_view(folder: Path, *args: str) -> ViewProcess:
    """`histoflow view <folder>` in a subprocess, once it printed its address."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = ViewProcess([sys.executable, "-m", "histoflow", "view", str(folder), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if " at http://" in line:
            host, port = line.rsplit("http://", 1)[1].strip().rstrip("/").rsplit(":", 1)
            process.address = (host, int(port))
            return process
    raise RuntimeError(f"histoflow view exited ({process.wait()}): {''.join(lines)[-3000:]}")


def get(address: tuple[str, int], path: str) -> int:
    """The status of a GET of `path` sent as it is (http.client does not normalise '..')."""
    connection = http.client.HTTPConnection(*address, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_nothing_outside_the_run_is_served(server: tuple[str, int], run: tuple[Path, Path]) -> None:
    folder, _ = run
    secret = folder.parent / "secret.txt"
    secret.write_text("not for the viewer")
    assert server[0] == "127.0.0.1"
    assert get(server, "/report/report.md") == 200 and get(server, "/slides/synthetic_files/11/0_0.jpeg") == 200
    for path in ("/report/../secret.txt", "/report/%2e%2e/secret.txt", "/report/..%2fsecret.txt",
                 "/report/..%5csecret.txt", f"/report/{secret}", "/static/../../../../../../etc/passwd",
                 "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/slides/../../secret.txt",
                 "/report/slides/synthetic.json", "/slides/synthetic_files/99/0_0.jpeg", "/../secret.txt"):
        assert get(server, path) in (400, 403, 404), path


def test_a_port_in_use_is_said(run: tuple[Path, Path], server: tuple[str, int]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-m", "histoflow", "view", str(run[0]), f"view.port={server[1]}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and f"view.port={server[1]}: the port is in use" in done.stdout + done.stderr

