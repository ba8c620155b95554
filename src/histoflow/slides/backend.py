"""Which backend reads a slide (slide.backend): OpenSlide, histoflow's tifffile reader, or `auto`, OpenSlide where it
opens the file and tifffile where it does not (slides/slide.py describes both)."""

from __future__ import annotations

import logging
import os

from histoflow.common.errors import ConfigError
from histoflow.slides.openslide_reader import OpenSlideSlide, UnsupportedByOpenSlide
from histoflow.slides.slide import Slide, SlideError
from histoflow.slides.tiff_reader import TiffSlide

log = logging.getLogger(__name__)
BACKENDS = ("auto", "openslide", "tifffile")
# tifffile stays the default until OpenSlide matches it on histoflow's own checks (see docs/prediction.md): damaged
# stored tiles named one by one, pixel-exact reads at levels of non-integer downsample, flat memory on huge slides
DEFAULT_BACKEND = "auto"


def open_slide(path: str | os.PathLike[str], backend: str = DEFAULT_BACKEND, source_mpp: float | None = None) -> Slide:
    """The slide at `path` through `backend` (BACKENDS): `auto` tries OpenSlide, then tifffile where OpenSlide
    does not read the format (logged)."""
    if backend not in BACKENDS:
        raise ConfigError(f"slide.backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "tifffile":
        return TiffSlide(path, source_mpp)
    try:
        slide = OpenSlideSlide(path, source_mpp)
    except UnsupportedByOpenSlide as e:
        if backend == "openslide":
            raise
        log.info("%s: %s; read with tifffile instead", path, e.reason)
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
        log.info("%s: OpenSlide sees one level, tifffile %d (a SubIFD pyramid); read with tifffile",
                 slide.path, len(tiff.levels))
        slide.close()
        return tiff
    tiff.close()
    return slide
