"""skimage-compatible H&E-DAB unmixing in torch: the reference data.transforms.hed_jitter is tested against."""

from __future__ import annotations

import math

import torch

from histoflow.data.transforms import HED_FROM_RGB, RGB_FROM_HED

LOG_ADJUST = math.log(1e-6)  # skimage's floor on intensities, which also scales its stain units


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Stain densities of RGB values in 0-255 (..., 3), in skimage.color.rgb2hed units but not clipped at 0."""
    log_rgb = torch.log(torch.clamp(rgb.double() / 255.0, min=1e-6))
    return (log_rgb / LOG_ADJUST) @ HED_FROM_RGB


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """RGB in 0-255 of stain densities (..., 3), as skimage.color.hed2rgb (times 255)."""
    return torch.clamp(torch.exp((hed.double() * LOG_ADJUST) @ RGB_FROM_HED), 0, 1) * 255.0
