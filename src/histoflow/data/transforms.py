"""Patch transforms: uint8 (B, S, S, 3) patches -> float32 (B, 3, c, c) network input, a whole batch at once.

Training crops a random c x c window and flips each patch at random; evaluation takes the centre
window. Normalisation uses the training statistics of the prepare step:

- ``image``: subtract the training mean image (Caffe's mean file) at the very source pixels each
  output pixel came from, i.e. the mean is cropped (and flipped) exactly as the patch was, as Caffe's
  DataTransformer does; then divide by 255. Evaluation gives the centre crop of (patch - mean) / 255.
- ``channel``: subtract the training channel mean, divide by the channel standard deviation.
- ``imagenet`` / ``fixed``: (x / 255 - mean) / std with ImageNet's or given numbers (an encoder's, in 0-1 units).
- ``none``: divide by 255.

A ``resize`` side then scales the crops to a pretrained encoder's input size (one interpolate per batch).

Why not torchvision.transforms.v2: a v2 transform draws one set of random parameters per call, so on
a batch every patch would get the same crop and flip, while per-patch calls of v2 crop, flips and
normalise run at ~10,000 patches/s, a tenth of this module. Here the random crops and flips of all
the patches of a batch are one gather. kornia.augmentation draws per-sample parameters on a batch but ran
6x slower on these patches (17x with colour jitter) and has no HED jitter (benchmarks/bench_transforms.py).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from histoflow.common.errors import ConfigError
from histoflow.data.loader_config import LoaderConfig

NORMALIZE = ("image", "channel", "imagenet", "fixed", "none")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# what torchvision's ImageNet weights were trained on: (x / 255 - mean) / std
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Ruifrok & Johnston's H&E-DAB stain vectors, as skimage.color.rgb_from_hed / hed_from_rgb
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def hed_jitter(rgb: torch.Tensor, sigma: float) -> torch.Tensor:
    """Jitter each patch's stains: s * a + b, a ~ U(1-sigma, 1+sigma), b ~ U(-sigma, sigma); (B, 3, H, W) 0-255."""
    # Tellez et al.'s HED augmentation. The stains s are optical densities (-ln intensity) unmixed with
    # rgb2hed's matrix, i.e. skimage's units times -ln(1e-6), so b is a density shift whatever scaling
    # skimage uses (it changed across versions): hematoxylin is ~1 in H&E tissue, sigma 0.05 a light
    # jitter (~3 grey levels on average). Unmixing, jitter and mixing fold into one affine map of the
    # log intensities per patch: ln(rgb') = ln(rgb) @ (H diag(a) R) - b @ R.
    if sigma <= 0:
        return rgb.float()
    n = rgb.shape[0]
    alpha = 1 + (torch.rand(n, 3, dtype=torch.float64) * 2 - 1) * sigma
    beta = (torch.rand(n, 3, dtype=torch.float64) * 2 - 1) * sigma
    mix = (HED_FROM_RGB[None] * alpha[:, None, :]) @ RGB_FROM_HED  # (B, 3, 3), acts on row vectors
    shift = -(beta @ RGB_FROM_HED)  # (B, 3)
    log_rgb = torch.log(torch.clamp(rgb.reshape(n, 3, -1).float() / 255.0, min=1e-6))
    mix, shift = mix.float().transpose(1, 2).to(rgb.device), shift.float()[:, :, None].to(rgb.device)
    out = torch.baddbmm(shift, mix, log_rgb).exp_()
    return out.clamp_(0, 1).mul_(255.0).reshape(rgb.shape)


LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 grey, as torchvision's rgb_to_grayscale
JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


def colour_jitter(rgb: torch.Tensor, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                  hue: float = 0.0) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue per patch, as one affine map of its RGB: (B, 3, ...) 0-255.

    Factors are drawn per patch as torchvision's ColorJitter draws them per call: brightness, contrast and
    saturation from U(1-x, 1+x), hue from U(-x, x) turns of the colour circle (x <= 0.5), the hue turned
    about the grey axis of RGB. Every step maps grey to grey, so they fold into x' = M x + m (one bmm).
    """
    if not any((brightness, contrast, saturation, hue)):
        return rgb.float()
    n = rgb.shape[0]
    x = rgb.reshape(n, 3, -1).float()
    draw = lambda strength: 1 + (torch.rand(n) * 2 - 1) * strength  # noqa: E731
    b, c, s = draw(brightness), draw(contrast), draw(saturation)
    theta = (torch.rand(n) * 2 - 1) * hue * 2 * math.pi
    luma = LUMA.to(x.device)
    eye, grey = torch.eye(3), LUMA.expand(3, 3)  # grey: every row the luma weights
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * grey  # (B, 3, 3)
    # rotation by theta about (1, 1, 1) / sqrt(3) (Rodrigues)
    k = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    rot = eye + sin * k + (1 - cos) * (k @ k)
    mix = (rot @ sat) * (b * c)[:, None, None]
    # contrast blends toward the patch's mean grey (after brightness), which the other steps keep grey
    mean_grey = b.to(x.device) * torch.einsum("c,bcp->b", luma, x) / x.shape[-1]
    shift = ((1 - c).to(x.device) * mean_grey)[:, None, None]
    out = torch.baddbmm(shift.expand(n, 3, 1), mix.to(x.device), x)
    return out.clamp_(0, 255).reshape(rgb.shape)


class PatchTransform:
    """Crop, flip, colour-jitter and normalise batches of uint8 HWC patches into float CHW tensors.

    `stain` is the image-level step that came before the patches were cut (prepare's stain normalisation):
    not applied here, but carried so that whoever cuts new patches (prediction) applies it first.
    """

    def __init__(self, crop: int | None, stats: Mapping[str, Any], normalize: str = "image", train: bool = False,
                 flips: bool | str = True, hed_jitter: float = 0.0,
                 stain: Callable[[np.ndarray], np.ndarray] | None = None,
                 jitter: Mapping[str, float] | None = None, scale: float | None = None, grey: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, resize: int | None = None,
                 interpolation: str = "bilinear") -> None:
        if normalize not in NORMALIZE:
            raise ConfigError(f"data.loader.normalize={normalize!r}: expected one of {', '.join(NORMALIZE)}")
        mean_image = torch.as_tensor(np.asarray(stats["mean_image"]), dtype=torch.float32)
        self.side = side = mean_image.shape[0]
        crop = crop or side
        if not 0 < crop <= side:
            raise ConfigError(f"data.loader.crop={crop}: must be between 1 and the patch side {side}")
        self.crop, self.normalize, self.train = crop, normalize, train
        if flips not in (True, False, "horizontal"):
            raise ConfigError(f"data.loader.flips={flips!r}: expected true (both axes), horizontal (mirror, as Caffe) "
                             "or false")
        self.flips, self.hed_sigma, self.stain = flips, float(hed_jitter), stain
        unknown = sorted(set(jitter or {}) - set(JITTER_KEYS))
        if unknown:
            raise ConfigError(f"data.loader.colour_jitter: unknown key(s) {unknown}; known: {', '.join(JITTER_KEYS)}")
        self.jitter = {k: float(v or 0.0) for k, v in (jitter or {}).items()}
        if not 0 <= self.jitter.get("hue", 0.0) <= 0.5:
            raise ConfigError(f"data.loader.colour_jitter.hue={self.jitter['hue']}: must be between 0 and 0.5")
        # mean: (3, side*side) to subtract at each output pixel's source pixel; scale: divisor per channel
        self.mean: torch.Tensor | None = None
        self.scale = torch.full((1, 3, 1), 255.0)
        if scale is not None:
            if normalize not in ("image", "none") or not scale > 0:
                raise ConfigError(f"data.loader.scale={scale}: a positive divisor, for normalize=image or none only")
            self.scale = torch.full((1, 3, 1), float(scale))
        self.grey = bool(grey)
        if self.grey and normalize not in ("image", "none"):
            raise ConfigError(f"data.loader.grey=true with normalize={normalize}: grey inputs take normalize=image "
                             "(minus the grey mean image) or none")
        if normalize == "image":
            pixels_mean = mean_image.permute(2, 0, 1).reshape(3, side * side)
            self.mean = (LUMA @ pixels_mean).expand(3, -1).contiguous() if self.grey else pixels_mean.contiguous()
        elif normalize == "channel":
            channel_mean = torch.as_tensor(np.asarray(stats["channel_mean"]), dtype=torch.float32)
            self.mean = channel_mean[:, None].expand(3, side * side).contiguous()
            std = torch.as_tensor(np.asarray(stats["channel_std"]), dtype=torch.float32)
            self.scale = torch.clamp(std, min=1e-3).reshape(1, 3, 1)  # a blank channel has std 0
        elif normalize in ("imagenet", "fixed"):
            if normalize == "imagenet":
                mean, std = IMAGENET_MEAN, IMAGENET_STD
            elif mean is None or std is None or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ConfigError(f"data.loader.normalize=fixed takes data.loader.mean and data.loader.std, three "
                                  f"numbers each in 0-1 units (std > 0), e.g. an encoder's; got mean={mean}, std={std}")
            self.mean = (torch.tensor(mean, dtype=torch.float32) * 255.0)[:, None].expand(3, side * side).contiguous()
            self.scale = (torch.tensor(std, dtype=torch.float32) * 255.0).reshape(1, 3, 1)
        if resize is not None and not resize > 0:
            raise ConfigError(f"data.loader.resize={resize}: a positive side in pixels, or null (the crop as cut)")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"data.loader.interpolation={interpolation!r}: "
                              f"expected one of {', '.join(INTERPOLATIONS)}")
        self.resize = None if resize in (None, crop) else int(resize)
        self.interpolation = interpolation

    def __call__(self, patches: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) or (S, S, 3) uint8 -> (B, 3, c, c) or (3, c, c) float32, on the patches' device."""
        x = torch.as_tensor(patches)
        single = x.ndim == 3
        x = x[None] if single else x
        n, side, crop = x.shape[0], self.side, self.crop
        if x.shape[1:] != (side, side, 3):
            raise ValueError(f"patches of shape {tuple(x.shape[1:])}; this transform expects "
                             f"({side}, {side}, 3), the prepared patch side")
        # channel-first on uint8 is cheap; on float the HWC->CHW copy costs more than everything else
        chw = x.permute(0, 3, 1, 2).contiguous().view(n, 3, side * side)
        index = self._source_pixels(n, x.device).view(n, 1, crop * crop).expand(-1, 3, -1)
        out = torch.gather(chw, 2, index)
        out = hed_jitter(out, self.hed_sigma) if self.train and self.hed_sigma > 0 else out.float()
        if self.train and any(self.jitter.values()):
            out = colour_jitter(out, **self.jitter)
        if self.grey:  # a stain-free input: luma in all three channels, so any net takes it unchanged
            out = torch.einsum("c,bcp->bp", LUMA.to(out.device), out)[:, None].expand(-1, 3, -1).contiguous()
        if self.mean is not None:
            out.sub_(torch.gather(self.mean.to(x.device).expand(n, -1, -1), 2, index))
        out = out.div_(self.scale.to(x.device)).view(n, 3, crop, crop)
        if self.resize:
            out = F.interpolate(out, size=(self.resize, self.resize), mode=self.interpolation,
                                **({} if self.interpolation == "nearest" else {"align_corners": False}))
        return out[0] if single else out

    def key(self) -> tuple:
        """What decides an evaluation transform's output: transforms with equal keys make equal inputs of the same
        patches (prediction prepares them once for all such models). A training transform draws at random: its own."""
        if self.train:
            return ("train", id(self))
        mean = None if self.mean is None else hashlib.sha256(self.mean.numpy().tobytes()).hexdigest()
        return (self.side, self.crop, self.normalize, self.grey, mean, tuple(self.scale.flatten().tolist()),
                self.resize, self.interpolation)

    @property
    def out_side(self) -> int:
        """Side of the network input this transform makes: the resize side, else the crop."""
        return self.resize or self.crop

    def _source_pixels(self, n: int, device: torch.device) -> torch.Tensor:
        """Flat source index (n, c, c) of each output pixel: crop offset plus any flips, built on `device`.

        The draws (four numbers a patch) come from the CPU generator, so a seed gives the same crops on every
        device; the index (c * c a patch) is built where the patches are: on a GPU, building it on the CPU and
        copying it over cost more than the training step of the 32-px net (benchmarks/gpu_check.py).
        """
        steps = torch.arange(self.crop, device=device)
        if self.train:
            top = torch.randint(0, self.side - self.crop + 1, (n, 1)).to(device)
            left = torch.randint(0, self.side - self.crop + 1, (n, 1)).to(device)
            rows, cols = top + steps, left + steps
            if self.flips is True:
                rows = torch.where((torch.rand(n, 1) < 0.5).to(device), rows.flip(1), rows)
            if self.flips:
                cols = torch.where((torch.rand(n, 1) < 0.5).to(device), cols.flip(1), cols)
        else:
            start = (self.side - self.crop) // 2
            rows = cols = (start + steps).expand(n, -1)
        return rows[:, :, None] * self.side + cols[:, None, :]


def build_transform(loader: LoaderConfig | Mapping[str, Any], stats: Mapping[str, Any], train: bool,
                    stain: Callable[[np.ndarray], np.ndarray] | None = None) -> PatchTransform:
    """The training or evaluation transform of a `data.loader` config (a LoaderConfig, or a mapping read into one:
    its defaults and checks) and the prepare step's statistics."""
    if not isinstance(loader, LoaderConfig):
        loader = LoaderConfig.from_config(loader)
    return PatchTransform(crop=loader.crop, stats=stats, normalize=loader.normalize, train=train, flips=loader.flips,
                          hed_jitter=loader.hed_jitter, jitter=loader.colour_jitter, scale=loader.scale,
                          grey=loader.grey, stain=stain, mean=loader.mean, std=loader.std, resize=loader.resize,
                          interpolation=loader.interpolation)
