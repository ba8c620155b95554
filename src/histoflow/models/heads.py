"""Heads on frozen features, and the frozen encoder they sit on.

An encoder is any model config built without a head (num_classes=0): a timm model's pooled features, or a
torchvision model with its classification layer replaced by the identity. Its features are embedded once
(histoflow.features.embeddings); heads train on them in seconds; prediction runs encoder and head as one net.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping

import hydra
import torch
from hydra.errors import InstantiationException
from torch import nn

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError, HistoflowError


class LinearHead(nn.Module):
    """Linear probing: one linear layer on the features (the protocol foundation-model benchmarks report)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class MLPHead(nn.Module):
    """A small MLP on the features: linear, GELU, dropout, linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_encoder(encoder_cfg: Mapping[str, Any], input_size: int) -> tuple[nn.Module, int]:
    """The frozen encoder of a model config (no head, eval mode, no gradients) and its feature width, measured by
    one forward pass at the input side it will see."""
    cfg = dict(to_builtin(encoder_cfg))
    cfg.pop("preprocess", None)
    cfg.pop("freeze_backbone", None)
    extra = {"input_size": input_size} if "input_size" in cfg else {}
    try:
        encoder = hydra.utils.instantiate(cfg, num_classes=0, **extra).eval()
    except InstantiationException as e:
        # the model builders name their keys model.*; here the same keys are encoder.* (model.* is the head)
        cause = e.__cause__
        if isinstance(cause, HistoflowError):
            raise type(cause)(re.sub(r"\bmodel\.(name|weights|pretrained)\b", r"encoder.\1", str(cause))) from cause
        raise
    encoder.requires_grad_(False)
    with torch.inference_mode():
        out = encoder(torch.zeros(1, 3, input_size, input_size))
    if out.ndim != 2:
        raise ConfigError(f"encoder {cfg.get('name', cfg.get('_target_'))} gives features of shape {tuple(out.shape)} "
                          f"at {input_size} px, not (batch, width): it has no pooled-features form (num_classes=0)")
    return encoder, int(out.shape[1])


def encoder_with_head(encoder: nn.Module, head: nn.Module) -> nn.Sequential:
    """Encoder and head as one net of patches, for prediction on new images and slides."""
    return nn.Sequential(OrderedDict(encoder=encoder, head=head))
