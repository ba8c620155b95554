"""The `data.loader` section: batching, loader workers and the patch transforms' settings, with defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from histoflow.common.config import at_least, read_section
from histoflow.common.errors import ConfigError
from histoflow.common.machine import AUTO, resolve_workers


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
    device_prefetch: bool | str = "auto"  # copy the next batch to the device while this one trains (a side CUDA
    #                                      stream: data/device_prefetch.py); auto: where the model runs on CUDA

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "LoaderConfig":
        return read_section(cls, cfg, "data.loader")

    def __post_init__(self) -> None:
        for key, low, optional in (("batch_size", 1, False), ("eval_batch_size", 1, True),
                                   ("shuffle_buffer", 0, False), ("crop", 1, True), ("epoch_batches", 1, True)):
            at_least(getattr(self, key), low, f"data.loader.{key}", optional)
        resolve_workers(self.num_workers, "data.loader.num_workers", "cpu")
        self.prefetches("cpu")

    def prefetches(self, device_type: str) -> bool:
        """Whether batches go to a `device_type` device one step ahead: device_prefetch, `auto` on CUDA only."""
        if self.device_prefetch == AUTO:
            return device_type == "cuda"
        if not isinstance(self.device_prefetch, bool):
            raise ConfigError(f"data.loader.device_prefetch={self.device_prefetch!r}: expected auto, true or false. "
                              "Fix: data.loader.device_prefetch=auto (on where the model runs on a CUDA GPU)")
        return self.device_prefetch
