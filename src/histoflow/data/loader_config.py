"""The `data.loader` section: batching, loader workers and the patch transforms' settings, with defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from histoflow.common.config import at_least, read_section
from histoflow.common.machine import resolve_workers


@dataclass
class LoaderConfig:
    """The `data.loader` section: batching, workers and patch transforms."""

    batch_size: int = 128
    eval_batch_size: int | None = None  # None: batch_size
    num_workers: int | str = "auto"  # per DDP rank; auto: 0 on a CPU, CPUs per rank less one beside a GPU
    #                                  (common/machine.py)
    shuffle_buffer: int = 5000  # samples held per worker for shuffling (about 4 kB each); 0: off
    crop: int | None = 32  # side of the network input cut from each patch; None: the whole patch
    normalize: str = "image"  # image | channel | imagenet | fixed (mean, std) | none; image/channel: this fold's
    #                           statistics
    mean: list[float] | None = None  # normalize=fixed: RGB mean in 0-1 units, e.g. a pretrained encoder's
    std: list[float] | None = None
    resize: int | None = None  # scale each crop to this side for the net (a pretrained encoder's input); None: as cut
    interpolation: str = "bilinear"  # of resize: nearest | bilinear | bicubic
    scale: float | None = None  # image | none: divide by this after subtracting (None: 255); Caffe's mean_file: 1
    flips: bool | str = True  # training: true: random flips of both axes | horizontal: mirror only (Caffe) | false
    hed_jitter: float = 0.0  # sigma of the H&E-DAB stain jitter in training; 0: off
    colour_jitter: dict[str, float] | None = None  # brightness, contrast, saturation, hue strengths in training
    grey: bool = False  # a stain-free input: every patch as its luma in all three channels (training and prediction)
    pin_memory: bool = True  # only takes effect when CUDA is available
    persistent_workers: bool = False
    epoch_batches: int | None = None  # training batches per epoch and rank; None: training samples / (batch * ranks)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "LoaderConfig":
        return read_section(cls, cfg, "data.loader")

    def __post_init__(self) -> None:
        for key, low, optional in (("batch_size", 1, False), ("eval_batch_size", 1, True),
                                   ("shuffle_buffer", 0, False), ("crop", 1, True), ("epoch_batches", 1, True)):
            at_least(getattr(self, key), low, f"data.loader.{key}", optional)
        resolve_workers(self.num_workers, "data.loader.num_workers", "cpu")
