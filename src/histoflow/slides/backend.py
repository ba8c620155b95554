"""Which backend reads a slide (slide.backend): OpenSlide, histoflow's tifffile reader, or `auto`, OpenSlide where it
opens the file and tifffile where it does not (slides/slide.py describes both)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from histoflow.common.errors import ConfigError
from histoflow.slides.openslide_reader import OpenSlideSlide, UnsupportedByOpenSlide
from histoflow.slides.slide import Slide, SlideError
from histoflow.slides.tiff_reader import TiffSlide

log = logging.getLogger(__name__)
_said: set[tuple[str, str]] = set()  # (slide, choice) logged: once per slide, not per open (loader workers reopen)
BACKENDS = ("auto", "openslide", "tifffile")
# OpenSlide for every format it reads as a pyramid; slide.backend=tifffile reads SVS and TIFF faster
# (docs/benchmarks.md)
DEFAULT_BACKEND = "auto"
# Every suffix a backend opens as a slide: OpenSlide 4's formats (Aperio .svs/.tif, DICOM .dcm, Hamamatsu .ndpi/.vms/
# .vmu, Leica .scn, MIRAX .mrxs, Philips .tiff, Sakura .svslide, Trestle .tif, Ventana .bif/.tif, Zeiss .czi) and the
# TIFFs the tifffile reader opens. The one list: a folder of slides is searched for these.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm")


def slides_in(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Of the files of a folder (sorted), the slides, and the files skipped as no slide. A DICOM slide is a folder of
    .dcm files (its levels), opened through any one of them: its first stands for it. A MIRAX slide's data folder
    (beside its .mrxs, of the same name) and a Hamamatsu .vms's image files are parts of those slides, not skipped."""
    slides, skipped, dicom = [], [], set()
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".dcm":
            if file.parent not in dicom:
                dicom.add(file.parent)
                slides.append(file)
        elif suffix in SLIDE_SUFFIXES:
            slides.append(file)
        elif not _part_of_a_slide(file):
            skipped.append(file)
    return slides, skipped


def _part_of_a_slide(file: Path) -> bool:
    mirax = file.parent.with_name(file.parent.name + ".mrxs").is_file()
    hamamatsu = file.suffix.lower() in (".jpg", ".jpeg", ".opt") and any(file.parent.glob("*.vms"))
    return mirax or hamamatsu


def open_slide(path: str | os.PathLike[str], backend: str = DEFAULT_BACKEND, source_mpp: float | None = None,
               mpp: float | None = None) -> Slide:
    """The slide at `path` through `backend` (BACKENDS): `auto` tries OpenSlide, then tifffile where OpenSlide
    does not read the format (logged). `source_mpp` serves where the file gives no microns per pixel; `mpp` (a
    slide table's `mpp` column for this slide) wins over the file's, with a warning where they differ."""
    if backend not in BACKENDS:
        raise ConfigError(f"slide.backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if mpp is not None and not mpp > 0:
        raise ConfigError(f"{path}: mpp={mpp} in the slide table: microns per pixel must be positive, e.g. 0.25 (40x)")
    slide = _open(path, backend, source_mpp)
    if mpp is not None:
        said = slide.file_mpp
        if said is not None and abs(said - mpp) > 0.05 * said:
            _say_once(path, f"the slide table's mpp={mpp} replaces the file's {said:.4g} microns per pixel",
                      logging.WARNING)
        slide.stated_mpp = float(mpp)
    return slide


def _open(path: str | os.PathLike[str], backend: str, source_mpp: float | None) -> Slide:
    if backend == "tifffile":
        return TiffSlide(path, source_mpp)
    try:
        slide = OpenSlideSlide(path, source_mpp)
    except UnsupportedByOpenSlide as e:
        if backend == "openslide":
            raise
        _say_once(path, f"{e.reason}; read with tifffile instead")
        return TiffSlide(path, source_mpp)
    if backend == "auto" and len(slide.levels) == 1:
        return _fuller_pyramid(slide)
    return slide


def _fuller_pyramid(slide: Slide) -> Slide:
    """A TIFF whose pyramid is in SubIFDs (tifffile's, QuPath's, OME-TIFF's) is one level to OpenSlide: the tifffile
    reader, where it finds more levels, else the OpenSlide slide as it is."""
    try:
        tiff = TiffSlide(slide.path, slide.source_mpp)
    except SlideError:  # not a TIFF tifffile reads (MRXS, DICOM...)
        return slide
    if len(tiff.levels) > len(slide.levels):
        _say_once(slide.path, f"OpenSlide sees one level, tifffile {len(tiff.levels)} (a SubIFD pyramid); read with "
                  "tifffile")
        slide.close()
        return tiff
    tiff.close()
    return slide


def _say_once(path: str | os.PathLike[str], choice: str, level: int = logging.INFO) -> None:
    if (str(path), choice) not in _said:
        _said.add((str(path), choice))
        log.log(level, "%s: %s", path, choice)
