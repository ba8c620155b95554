"""Which backend reads a slide (slide.backend): OpenSlide, histoflow's tifffile reader, or `auto`, OpenSlide where it
opens the file and tifffile where it does not (slides/slide.py describes both)."""

from __future__ import annotations

import logging
import os

from histoflow.common.errors import ConfigError
from histoflow.slides.openslide_reader import OpenSlideSlide, UnsupportedByOpenSlide
from histoflow.slides.slide import Slide
from histoflow.slides.tiff_reader import TiffSlide

log = logging.getLogger(__name__)
BACKENDS = ("auto", "openslide", "tifffile")
# tifffile stays the default until OpenSlide matches it on histoflow's own checks (see docs/prediction.md): damaged
# stored tiles named one by one, pixel-exact reads at levels of non-integer downsample, flat memory on huge slides
DEFAULT_BACKEND = "tifffile"


def open_slide(path: str | os.PathLike[str], backend: str = DEFAULT_BACKEND, source_mpp: float | None = None) -> Slide:
    """The slide at `path` through `backend` (BACKENDS): `auto` tries OpenSlide, then tifffile where OpenSlide
    does not read the format (logged)."""
    if backend not in BACKENDS:
        raise ConfigError(f"slide.backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "tifffile":
        return TiffSlide(path, source_mpp)
    try:
        return OpenSlideSlide(path, source_mpp)
    except UnsupportedByOpenSlide as e:
        if backend == "openslide":
            raise
        log.info("%s: %s; read with tifffile instead", path, e.reason)
        return TiffSlide(path, source_mpp)
