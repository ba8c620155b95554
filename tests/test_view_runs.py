"""histoflow view opens the runs of bag heads, as they are written: a slide-bag multirun (its k-fold report and its
held-out slides' attention maps) and its deployment on new slides (deployment/cohort_predict.py: slides.csv with the
`output` column, patients.csv, slides/ and attention_maps/). The pages list the slides and offer the attention
overlay, drawn from the run's own map. The deployment's table holds two slides of one file name and a name with dots,
listed so that the patient bags take them in another order than the table: each slide's probability map, attention
map and slides.csv row must still be its own. The sweep is test_cohort_predict's (three folds of ABMIL on patient
bags of conftest's generated-tissue cohort)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from test_cohort_predict import config, read, slide_cohort, sweep  # noqa: F401 (fixtures)
from test_slide_bags import table_rows

from histoflow.deployment.deploy import predict
from histoflow.inference.sweep_report import write_image_report
from histoflow.viewer.overlays import colour
from histoflow.viewer.run_folder import read_run
from histoflow.viewer.site import Site


def served_overlay(site: Site, name: str, key: str) -> np.ndarray:
    png = site.get(f"slides/{name}.{key}.png")
    assert png is not None, f"{name}: no {key} overlay served"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def check_attention(site: Site, name: str, map_path: Path) -> None:
    """The served attention overlay is the run's map: one pixel per grid cell, its colour, transparent off tissue."""
    grid = np.load(map_path)[..., 0]
    np.testing.assert_array_equal(served_overlay(site, name, "attention"), colour(grid))
    script = site.get(f"slides/{name}.js").decode()
    data = json.loads(script.split("=", 1)[1].strip().rstrip(";"))
    assert "attention" in [o["key"] for o in data["overlays"]]


def test_a_slide_bag_multirun_is_viewed_with_its_attention_maps(sweep: Path) -> None:  # noqa: F811
    write_image_report(sweep)
    maps = sorted((sweep / "image_report" / "attention_maps").glob("*.map.npy"))
    assert maps
    run = read_run(sweep)
    site = Site(run)
    try:
        assert run.report_dir == sweep / "image_report" and b"<table" in site.get("report/index.html")
        assert set(run.slides) == {p.name.removesuffix(".map.npy") for p in maps}
        index = site.get("index.html").decode()
        for path in maps:
            name = path.name.removesuffix(".map.npy")
            entry = run.slides[name]
            assert [m.kind for m in entry.maps] == ["attention"] and entry.path.is_file()
            assert f'href="slides/{name}.html"' in index and entry.row["fold"] in {"1", "2", "3"}
            check_attention(site, name, path)
    finally:
        site.close()


def new_slides(cohort: Path, sweep: Path, folder: Path) -> Path:  # noqa: F811
    """A table of new slides in the order that tells the names apart: P1's first slide, a copy of P2's slide under
    P1's second slide's file name (another folder), P1's second slide, a copy of P2's other slide with dots in its
    name. Slides without tissue (the sweep's problems) are not taken."""
    with (sweep / "0" / "problems.csv").open(newline="") as handle:
        no_tissue = {Path(r["path"]).name for r in csv.DictReader(handle)}
    by_patient: dict[str, list[Path]] = {}
    for r in table_rows(cohort):
        path = (cohort.parent / r["slide"]).resolve()
        if path.name not in no_tissue:
            by_patient.setdefault(r["patient"], []).append(path)
    (p1, (a1, a2, *_)), (p2, (b1, b2, *_)) = [(p, s) for p, s in by_patient.items() if len(s) >= 2][:2]
    (folder / "elsewhere").mkdir(parents=True)
    same_name = shutil.copy(b1, folder / "elsewhere" / a2.name)
    dotted = shutil.copy(b2, folder / "elsewhere" / f"{b2.stem}.scan.v2{b2.suffix}")
    table = folder / "new.csv"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([["slide", "patient"], [a1, p1], [same_name, p2], [a2, p1], [dotted, p2]])
    return table


def test_a_deployment_is_viewed_each_slide_with_its_own_maps_and_row(sweep: Path, slide_cohort: Path,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    predict(config(sweep, new_slides(slide_cohort, sweep, tmp_path), out))
    rows = read(out / "slides.csv")
    outputs = [r["output"] for r in rows]
    stem = Path(rows[2]["slide"]).stem
    assert outputs[1:3] == [stem, f"{stem}-2"] and outputs[3].endswith(".scan.v2")  # the table's order names them
    assert (out / "patients.csv").is_file() and len(read(out / "patients.csv")) == 2
    for r in rows:  # each output's files are its slide's
        assert json.loads((out / "slides" / f"{r['output']}.json").read_text())["slide"] == r["slide"]
        assert json.loads((out / "attention_maps" / f"{r['output']}.json").read_text())["source"] == r["slide"]

    run = read_run(out)
    site = Site(run)
    try:
        assert set(run.slides) == set(outputs)
        index = site.get("index.html").decode()
        for r in rows:
            entry = run.slides[r["output"]]
            assert str(entry.source) == r["slide"] and entry.path == Path(r["slide"])
            assert sorted(m.kind for m in entry.maps) == ["attention", "probabilities"]
            assert entry.row["patient"] == r["patient"] and entry.row["prediction"] == r["predicted"]
            assert f'href="slides/{r["output"]}.html"' in index
            check_attention(site, r["output"], out / "attention_maps" / f"{r['output']}.map.npy")
            classes = run.slides[r["output"]].maps[0].channels
            probabilities = np.load(out / "slides" / f"{r['output']}.map.npy")
            np.testing.assert_array_equal(served_overlay(site, r["output"], f"prob_{classes[-1]}"),
                                          colour(probabilities[..., -1]))
    finally:
        site.close()
