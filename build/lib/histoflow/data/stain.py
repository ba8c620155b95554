"""Stain normalisation of whole images to a reference (Reinhard, Macenko), with torchstain's NumPy backend.

Images from different slides, labs and scanners differ in how strongly haematoxylin and eosin took
and how they were scanned. Normalising every image to one reference's stain before cutting patches
lets the net learn morphology rather than the colour of a slide:

- `reinhard` (Reinhard et al. 2001): match each LAB channel's mean and standard deviation.
- `macenko` (Macenko et al. 2009): estimate each image's H and E optical-density vectors and
  concentrations, and rebuild it with the reference's vectors and concentration range.

The fitted reference (a few numbers) is written with the prepared data and saved in every checkpoint,
so prediction applies exactly what training saw, without the reference file.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torchstain

from histoflow.common.config import read_section
from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.data.images import read_rgb

log = logging.getLogger(__name__)
METHODS = ("reinhard", "macenko")


@dataclass(frozen=True)
class StainConfig:
    """The `data.stain` section: which normalisation, to which reference image."""

    method: str | None = None  # null (off) | reinhard | macenko
    reference: str | None = None  # an image whose stain every image is mapped to

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> StainConfig:
        return read_section(cls, cfg, "data.stain")

    def __post_init__(self) -> None:
        if self.method not in (None, *METHODS):
            raise ConfigError(f"data.stain.method={self.method!r}: expected null, {' or '.join(METHODS)}")
        if self.method and not self.reference:
            raise ConfigError(f"data.stain.method={self.method} needs data.stain.reference: an image (file) whose "
                              "stain the others are mapped to, e.g. a well-stained training image")


class StainNormalizer:
    """Maps uint8 RGB images (H, W, 3) to the stain of a fitted reference; picklable for loader workers."""

    def __init__(self, method: str, params: Mapping[str, Any]) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown stain normalisation {method!r}: expected {' or '.join(METHODS)}")
        self.method = method
        self.params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        self._normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy") if method == "macenko" \
            else torchstain.normalizers.ReinhardNormalizer(backend="numpy")
        if method == "macenko":
            self._normalizer.HERef, self._normalizer.maxCRef = self.params["he"], self.params["max_c"]
        else:
            self._normalizer.target_means, self._normalizer.target_stds = self.params["means"], self.params["stds"]
        self.failed = 0  # images left as they were (e.g. Macenko on an image without stained pixels)

    @classmethod
    def fit(cls, method: str, reference: np.ndarray) -> StainNormalizer:
        """Fit to a reference image (H, W, 3) uint8."""
        if method == "macenko":
            fitted = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
            fitted.fit(reference)
            return cls(method, {"he": fitted.HERef, "max_c": fitted.maxCRef})
        fitted = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
        fitted.fit(reference)
        return cls(method, {"means": fitted.target_means, "stds": fitted.target_stds})

    @classmethod
    def from_config(cls, cfg: StainConfig) -> StainNormalizer | None:
        """The normaliser fitted to cfg.reference, or None when cfg.method is null."""
        if cfg.method is None:
            return None
        assert cfg.reference is not None  # StainConfig checks it
        path = Path(cfg.reference).expanduser()
        if not path.is_file():
            raise MissingInputError(f"data.stain.reference={cfg.reference}: no such image. Fix: point it at an image "
                                    "file (e.g. one of the training images)")
        return cls.fit(cfg.method, read_rgb(path)[0])

    def state(self) -> dict[str, Any]:
        """Plain numbers (JSON and `torch.load(weights_only=True)` safe) to rebuild this normaliser."""
        return {"method": self.method, "params": {k: v.tolist() for k, v in self.params.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> StainNormalizer | None:
        if not state:
            return None
        return cls(state["method"], state["params"])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The image (H, W, 3) uint8 in the reference's stain; unchanged (counted in `failed`) where it cannot be."""
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # empty slices of an image without stain
                if self.method == "macenko":
                    out, _, _ = self._normalizer.normalize(image, stains=False)
                else:
                    out = self._normalizer.normalize(image)
        except np.linalg.LinAlgError as e:
            # torchstain's Macenko with fewer than 4 stained pixels (optical density >= 0.15 in every channel): the
            # covariance it takes eigenvectors of is NaN. Reinhard does not fail; anything else is a bug and raises.
            self.failed += 1
            (log.warning if self.failed == 1 else log.debug)(
                "%s stain normalisation left an image unchanged: too little stain to estimate its stain vectors "
                "(%s); later ones at debug level, counted in `failed`", self.method, e)
            return image
        return np.asarray(out, dtype=np.uint8)
