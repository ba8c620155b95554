"""Pack what the GPU check needs beyond the GPU machine's image into .gpu-kit/ (git-ignored), and check it travels.

    python benchmarks/gpu_kit.py [--data ../shared/data] [--weights ../shared/weights] [--per-class 16]
                                 [--no-slide] [--limit-mib 64]

Run on this (CPU) machine, which reaches the package index; the GPU machine reaches nothing. It writes
  .gpu-kit/wheels/   wheels for CPython 3.12 on manylinux x86-64 of every distribution histoflow needs (its
                     requirements, followed down) that the image lacks (benchmarks/gpu_image_packages.txt), each at
                     the version installed here, so the GPU runs what CI tests; imagecodecs keeps only the codecs
                     histoflow's slide and image readers use (its full wheel is 25 MiB of the 64 MiB that travel);
  .gpu-kit/data/     lymphoma/: --per-class images of each class, spread over the cases of cases.csv (every case
                     kept where the count allows), with their rows of cases.csv; wsi/: the TCGA slide (JPEG 2000
                     tiles) unless --no-slide;
  .gpu-kit/weights/  the ImageNet SqueezeNet 1.1 features (embedding).
Then it lists the kit and checks that the kit and the working tree that travels with it (tracked and untracked,
not ignored files) fit in --limit-mib together. Exit 1 when they do not, naming the largest parts.
benchmarks/gpu_check.sh installs the wheels and runs the check on the GPU machine (device run, carry .gpu-kit).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu-kit"
IMAGE_PACKAGES = Path(__file__).with_name("gpu_image_packages.txt")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# imagecodecs modules that tifffile calls for histoflow's slides and images (JPEG, JPEG 2000, deflate, LZW and
# the predictors, PNG); the libraries they link are kept with them
IMAGECODECS_KEEP = {"_shared", "_shared_cython", "_imcd", "_jpeg8", "_jpeg2k", "_zlib", "_deflate", "_png"}
WEIGHTS = "squeezenet1_1-imagenet-features.pth"
SLIDE = "tcga-cr-7395-01a-01-ts1.svs"


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: str) -> list[str]:
    """The names a distribution requires, extras left out."""
    names = []
    for line in metadata.requires(dist) or []:
        requirement, _, marker = line.partition(";")
        if "extra" in marker:
            continue
        try:  # markers such as python_version: evaluated by packaging where it is there
            from packaging.markers import Marker
            if marker.strip() and not Marker(marker).evaluate({"python_version": "3.12", "sys_platform": "linux"}):
                continue
        except ImportError:
            pass
        names.append(re.split(r"[\s<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
    return names


def missing_distributions(root: str = "histoflow") -> dict[str, str]:
    """{name: version installed here} of what `root` needs, followed down, that the GPU image does not hold
    (a distribution the image holds brings its own needs)."""
    image = {normal(line) for line in IMAGE_PACKAGES.read_text().split("\n") if line and not line.startswith("#")}
    found: dict[str, str] = {}
    todo, seen = requirements(root), set()
    while todo:
        name = todo.pop()
        if normal(name) in seen or normal(name) in image:
            continue
        seen.add(normal(name))
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here, so not needed on this Python either (a marker for older Pythons)
        todo += requirements(name)
    return found


def download(name: str, version: str, folder: Path) -> Path:
    """The cp312 manylinux x86-64 wheel of name==version; a pure-Python sdist built into a wheel where the index
    has no wheel (antlr4-python3-runtime 4.9.3)."""
    before = set(folder.iterdir())
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                          "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder),
                          f"{name}=={version}"], capture_output=True, text=True)
    if got.returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder),
                        f"{name}=={version}"], check=True, capture_output=True, text=True)
    (wheel,) = set(folder.iterdir()) - before
    if got.returncode != 0 and not wheel.name.endswith("-py3-none-any.whl"):
        wheel.unlink()
        raise SystemExit(f"{name}=={version}: no wheel for CPython 3.12 on manylinux x86-64, and the one built "
                         f"here is not pure Python. Fix: pin a version with such a wheel")
    return wheel


def needed_libraries(folder: Path, modules: list[Path]) -> set[str]:
    """The bundled libraries (file names in `folder`) that the modules load, followed through the libraries."""
    bundled = {p.name for p in folder.iterdir()}
    keep: set[str] = set()
    todo = list(modules)
    while todo:
        elf = todo.pop()
        dynamic = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True, check=True).stdout
        for lib in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic):
            if lib in bundled and lib not in keep:
                keep.add(lib)
                todo.append(folder / lib)
    return keep


def trim_imagecodecs(wheel: Path) -> None:
    """Rewrite the imagecodecs wheel with only IMAGECODECS_KEEP's extension modules and the libraries they load
    (its RECORD listing what is left)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
        package, libs = root / "imagecodecs", root / "imagecodecs.libs"
        dropped = [so for so in package.glob("_*.so") if so.name.split(".")[0] not in IMAGECODECS_KEEP]
        for so in dropped:
            so.unlink()
        keep = needed_libraries(libs, list(package.glob("_*.so")))
        for lib in libs.iterdir():
            if lib.name not in keep:
                lib.unlink()
        (record,) = root.glob("*.dist-info/RECORD")
        record.write_text("".join(line + "\n" for line in record.read_text().splitlines()
                                  if (root / line.split(",")[0]).is_file()))
        wheel.unlink()
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                z.write(path, path.relative_to(root).as_posix())


def lymphoma_subset(source: Path, target: Path, per_class: int) -> int:
    """Copy per_class images of each class, taken in turn from each case of cases.csv, with their rows."""
    with (source / "cases.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    by_case: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_case[row["label"]][row["group"]].append(row)
    chosen = []
    for label, cases in sorted(by_case.items()):
        queues = [list(images) for _, images in sorted(cases.items())]
        picked: list[dict] = []
        while len(picked) < per_class and any(queues):
            for queue in queues:
                if queue and len(picked) < per_class:
                    picked.append(queue.pop(0))
        chosen += picked
    for row in chosen:
        (target / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / row["image"], target / row["image"])
    with (target / "cases.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    return len(chosen)


def travelling_files() -> list[Path]:
    """The working tree that travels to the device: tracked and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    return [REPO / p for p in listed.split("\0") if p and (REPO / p).is_file()]


def size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = REPO.parent / "shared"
    parser.add_argument("--data", type=Path, default=shared / "data", help="the folder holding lymphoma/ and wsi/")
    parser.add_argument("--weights", type=Path, default=shared / "weights")
    parser.add_argument("--per-class", type=int, default=16, help="lymphoma images per class")
    parser.add_argument("--no-slide", dest="slide", action="store_false", help=f"leave out wsi/{SLIDE} (3.9 MB)")
    parser.add_argument("--limit-mib", type=float, default=64.0)
    parser.add_argument("--kit", type=Path, default=KIT)
    args = parser.parse_args()
    for needed in (args.data / "lymphoma" / "cases.csv", args.weights / WEIGHTS):
        if not needed.is_file():
            print(f"{needed}: not found. Fix: pass --data / --weights (see ../shared/data/README.md)")
            return 2
    if args.kit.exists():
        shutil.rmtree(args.kit)  # one version of each wheel, nothing left from an earlier kit
    wheels = args.kit / "wheels"
    wheels.mkdir(parents=True)
    for name, version in sorted(missing_distributions().items()):
        wheel = download(name, version, wheels)
        if normal(name) == "imagecodecs":
            trim_imagecodecs(wheel)
    images = lymphoma_subset(args.data / "lymphoma", args.kit / "data" / "lymphoma", args.per_class)
    if args.slide:
        (args.kit / "data" / "wsi").mkdir(parents=True)
        shutil.copyfile(args.data / "wsi" / SLIDE, args.kit / "data" / "wsi" / SLIDE)
    (args.kit / "weights").mkdir()
    shutil.copyfile(args.weights / WEIGHTS, args.kit / "weights" / WEIGHTS)

    mib = 2 ** 20
    parts = {f"wheels/{w.name}": w.stat().st_size for w in sorted(wheels.iterdir())}
    parts[f"data/lymphoma ({images} images + cases.csv)"] = size([p for p in (args.kit / "data" / "lymphoma").rglob("*")
                                                                  if p.is_file()])
    if args.slide:
        parts[f"data/wsi/{SLIDE}"] = (args.kit / "data" / "wsi" / SLIDE).stat().st_size
    parts[f"weights/{WEIGHTS}"] = (args.kit / "weights" / WEIGHTS).stat().st_size
    tree = [p for p in travelling_files() if args.kit not in p.parents]
    parts[f"the working tree ({len(tree)} files)"] = size(tree)
    total = sum(parts.values())
    for name, nbytes in parts.items():
        print(f"{nbytes / mib:8.2f} MiB  {name}")
    print(f"{total / mib:8.2f} MiB  in all (limit {args.limit_mib:g} MiB)")
    if total > args.limit_mib * mib:
        largest = ", ".join(n for n, _ in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
        print(f"too large to travel. Fix: fewer --per-class images, no --slide, or smaller parts ({largest})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
