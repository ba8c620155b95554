"""AlexNet32: the small patch classifier of the lymphoma tutorial (Janowczyk & Madabhushi 2016).

It is Caffe's CIFAR-10 "quick" network (examples/cifar10/cifar10_quick_train_test.prototxt):

    conv 5x5x32 pad 2 -> max-pool 3/2 -> ReLU
    conv 5x5x32 pad 2 -> ReLU -> avg-pool 3/2
    conv 5x5x64 pad 2 -> ReLU -> avg-pool 3/2
    fully connected 64 -> fully connected num_classes
"""

from __future__ import annotations

import math

import torch
from torch import nn

from histoflow.common.errors import ConfigError


def _caffe_pool_size(size: int, kernel: int = 3, stride: int = 2) -> int:
    """Output side of a Caffe (ceil-mode, unpadded) pooling layer."""
    return math.ceil((size - kernel) / stride) + 1


class AlexNet32(nn.Module):
    """Caffe CIFAR-10 "quick" net for small patches (32, 64, 96 px...)."""

    def __init__(self, num_classes: int = 3, in_channels: int = 3, input_size: int = 32) -> None:
        super().__init__()
        if input_size < 3:
            raise ConfigError(f"input_size must be at least 3 pixels, got {input_size}")
        # Caffe rounds pooling output sizes up, so ceil_mode=True keeps 32 -> 16 -> 8 -> 4 as in the
        # original; PyTorch's floor default would give 15 -> 7 -> 3 and a different fc1.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=3, stride=2, ceil_mode=True),
        )
        side = input_size
        for _ in range(3):
            side = _caffe_pool_size(side)
        self.feature_size = 64 * side * side
        # No non-linearity between the two fully connected layers: Caffe's quick net has none (ip1 -> ip2).
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.feature_size, 64),
            nn.Linear(64, num_classes),
        )
        # PyTorch's default (Kaiming-uniform) init is kept: Caffe's gaussian std 1e-4 / 1e-2 / 1e-1 was
        # tuned for its SGD lr=1e-3 schedule and trains slowly or stalls under other optimizers, while the
        # default init trains reliably with Adagrad and SGD alike.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of shape (batch, num_classes)."""
        return self.classifier(self.features(x))
