"""A net from its `model` config and what the data decide: the number of classes, the input side, and (for a head
on frozen features) the encoder's feature width."""

from __future__ import annotations

from typing import Any, Mapping

import hydra
from torch import nn

from histoflow.common.config import to_builtin
from histoflow.common.errors import ConfigError


def require_head(model_cfg: Mapping[str, Any], encoder: bool) -> None:
    """With a frozen encoder the model must be a head on its features (it lists in_features): checked before any
    embedding, which `encoder=... model=alexnet32` once ran in full before a conv2d traceback."""
    if encoder and "in_features" not in model_cfg:
        raise ConfigError(f"model {model_cfg.get('name') or model_cfg.get('_target_')} takes patches, but encoder= "
                          "gives it features. Fix: put a head on the encoder (model=linear_head or model=mlp_head), or "
                          "drop encoder= to train this net on the patches")


def build_net(model_cfg: Mapping[str, Any], num_classes: int, input_size: int | None,
              in_features: int | None = None) -> nn.Module:
    """The net of a `model` config with num_classes, and where the config lists them, from the data: input_size
    (the input side) and in_features (a head's, the encoder's feature width)."""
    cfg = dict(to_builtin(model_cfg))
    cfg.pop("preprocess", None)  # the data loader's business (models.preprocess), not the constructor's
    extra: dict[str, Any] = {"input_size": input_size} if "input_size" in cfg else {}
    require_head(cfg, in_features is not None)
    if "in_features" in cfg:
        if in_features is None:
            raise ConfigError(f"model {cfg.get('_target_')} is a head on frozen features: it needs an encoder. "
                              "Fix: add encoder=<name> (conf/encoder), e.g. encoder=squeezenet1_1_imagenet")
        extra["in_features"] = in_features
    return hydra.utils.instantiate(cfg, num_classes=num_classes, **extra)
