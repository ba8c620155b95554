"""Cut an image into patches on a regular grid, at several rotations, without Python loops over pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from PIL import Image

from histoflow.common.config import at_least, read_section
from histoflow.common.errors import ConfigError


@dataclass
class PatchConfig:
    """Patch geometry. `size: null` treats each image as one tile (tile-folder data)."""

    size: int | None = 36  # window side, pixels
    stride: int = 32  # grid step, pixels
    rotations: list[int] = field(default_factory=lambda: [0, 90])  # degrees, counter-clockwise, multiples of 90
    min_tissue: float = 0.0  # drop patches with a smaller share of non-white pixels (0: keep all)
    resize: int | None = None  # tiles only: resize each tile to this side first (e.g. 224)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "PatchConfig":
        return read_section(cls, cfg, "data.patches")

    def __post_init__(self) -> None:
        section = "data.patches"
        at_least(self.size, 1, f"{section}.size", optional=True)
        at_least(self.stride, 1, f"{section}.stride")
        at_least(self.resize, 1, f"{section}.resize", optional=True)
        bad = [r for r in self.rotations if r % 90]
        if bad:
            raise ConfigError(f"{section}.rotations {bad}: only multiples of 90 degrees keep patches lossless")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"{section}.min_tissue={self.min_tissue}: a share between 0 and 1")

    def side(self, height: int, width: int) -> int:
        """Side of the stored patches for an image of this size."""
        return self.size or self.resize or height

    def count(self, height: int, width: int) -> int:
        """Number of grid patches (before any tissue filter) for an image of this size."""
        if self.size is None:
            return len(self.rotations)
        ny, nx = grid_shape(height, width, self.size, self.stride)
        return ny * nx * len(self.rotations)


def grid_shape(height: int, width: int, size: int, stride: int) -> tuple[int, int]:
    """Rows and columns of windows that fit entirely inside the image."""
    if height < size or width < size:
        return 0, 0
    return (height - size) // stride + 1, (width - size) // stride + 1


def grid_origins(height: int, width: int, size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the top-left corner of every window, row by row."""
    ny, nx = grid_shape(height, width, size, stride)
    ys, xs = np.meshgrid(np.arange(ny) * stride, np.arange(nx) * stride, indexing="ij")
    return xs.ravel(), ys.ravel()


def tissue_fraction(patches: np.ndarray, white: int = 220) -> np.ndarray:
    """Share of pixels in each patch that are not near-white background."""
    return (patches.min(axis=-1) < white).mean(axis=(1, 2))


def extract_patches(image: np.ndarray, cfg: PatchConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All patches of an (H, W, 3) image: (N, s, s, 3) uint8 and each one's x, y, rotation."""
    h, w = image.shape[:2]
    if cfg.size is None:
        if cfg.resize and (h, w) != (cfg.resize, cfg.resize):
            image = np.asarray(Image.fromarray(image).resize((cfg.resize, cfg.resize), Image.BILINEAR))
        windows, xs, ys = image[None], np.zeros(1, int), np.zeros(1, int)
    elif h < cfg.size or w < cfg.size:
        windows, xs, ys = (np.empty((0, cfg.size, cfg.size, image.shape[2]), image.dtype), np.zeros(0, int),
                           np.zeros(0, int))
    else:
        s = cfg.size
        view = np.lib.stride_tricks.sliding_window_view(image, (s, s), axis=(0, 1))[:: cfg.stride, :: cfg.stride]
        windows = view.transpose(0, 1, 3, 4, 2).reshape(-1, s, s, image.shape[2])  # (N, s, s, C), a copy
        xs, ys = grid_origins(h, w, s, cfg.stride)
    if cfg.min_tissue > 0:
        keep = tissue_fraction(windows) >= cfg.min_tissue
        windows, xs, ys = windows[keep], xs[keep], ys[keep]
    patches = np.concatenate([np.rot90(windows, k=r // 90, axes=(1, 2)) for r in cfg.rotations])
    rots = np.repeat(np.asarray(cfg.rotations), len(windows))
    return patches, np.tile(xs, len(cfg.rotations)), np.tile(ys, len(cfg.rotations)), rots
