"""docs/prediction.md's worked example, run for real: a slide cohort cut from ../shared/data/wsi
(slides/cohort_fixture), ABMIL on patient bags trained on the first half of its patients (three folds), then the
three fold models put to work on the other half as a new cohort (predictions, attention maps, GeoJSON), then its
external validation (the same slides with their labels); finally `histoflow view` on the deployment, a screenshot
of a real-tissue slide with its attention overlay -> docs/figures/viewer.png (the README's figure).

    python tools/deploy_example.py <work folder>      # writes <work>/example.json: the commands and what they wrote
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from headless_chromium import open_page  # noqa: E402

from histoflow.testing.cohort_fixture import build_cohort  # noqa: E402

WSI = Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data")) / "wsi"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}


def histoflow(*args: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "histoflow", *args], cwd=REPO, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"histoflow {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done.stderr[-1500:], time.perf_counter() - t0


def split(table: Path) -> tuple[Path, Path, Path]:
    """train.csv: the first half of each class's patients; new.csv (no label) and new_labelled.csv: the rest."""
    rows = list(csv.DictReader(table.open(newline="")))
    patients: dict[str, list[str]] = {}
    for r in rows:
        patients.setdefault(r["label"], [])
        if r["patient"] not in patients[r["label"]]:
            patients[r["label"]].append(r["patient"])
    train = {p for ps in patients.values() for p in ps[:(len(ps) + 1) // 2]}
    out = []
    for name, keep, cols in (("train.csv", True, ["slide", "patient", "label"]),
                             ("new.csv", False, ["slide", "patient"]),
                             ("new_labelled.csv", False, ["slide", "patient", "label"])):
        path = table.parent / name
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(r for r in rows if (r["patient"] in train) == keep)
        out.append(path)
    return out[0], out[1], out[2]


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    table = build_cohort(WSI, work / "cohort", per_source=8, side=1024)
    train, new, labelled = split(table)
    sweep, deploy, external = work / "multirun", work / "deploy", work / "external"
    commands = [
        ["train", "-m", "experiment=slides_abmil", f"data.table={train}", "data.split.k=3", "fold=1,2,3",
         "trainer.max_epochs=10", "logger=csv", f"paths.data_dir={work / 'data'}", f"hydra.sweep.dir={sweep}"],
        ["predict", f"ckpt_path={sweep}", f"slides={new}", "on_bad_image=skip", "slide.export=[geojson]",
         f"hydra.run.dir={deploy}"],
        ["predict", f"ckpt_path={sweep}", f"slides={labelled}", "on_bad_image=skip", f"hydra.run.dir={external}"],
    ]
    record = []
    for args in commands:
        _, seconds = histoflow(*args)
        record.append({"command": "histoflow " + " ".join(args), "seconds": round(seconds, 1)})
    record.append({"deploy_files": sorted(str(p.relative_to(deploy)) for p in deploy.rglob("*") if p.is_file()
                                          and ".hydra" not in p.parts)})
    record.append({"patients.csv": (deploy / "patients.csv").read_text()})
    record.append({"external report.md": (external / "report.md").read_text()})
    screenshot(deploy, REPO / "docs" / "figures" / "viewer.png")
    (work / "example.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def screenshot(folder: Path, png: Path) -> None:
    """`histoflow view <folder>`, the page of its slide with the most tiles, a screenshot."""
    rows = list(csv.DictReader((folder / "slides.csv").open(newline="")))
    best = max(rows, key=lambda r: int(r["tiles"]))
    view = subprocess.Popen([sys.executable, "-m", "histoflow", "view", str(folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        for line in view.stdout:
            if " at http://" in line:
                served = line.split(" at ", 1)[1].split()[0].rstrip("/") + "/"
                break
        page = open_page(f"{served}slides/{Path(best['slide']).stem}.html",
                         "document.body.dataset.ready && document.body.dataset.imageRect", size=(1200, 800))
        # a 256-colour palette: the README's figure at about 0.5 MB instead of 1.2 MB, the tissue still legible
        Image.open(io.BytesIO(page.png)).convert("RGB").quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(
            png, optimize=True)
    finally:
        view.terminate()
        view.wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
