"""Any torchvision classifier by name, with its head resized and weights from torchvision, a file or a URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

from histoflow.common.errors import ConfigError, HistoflowError, MissingInputError
from histoflow.models.weights_file import read_weights_file

LIGHTNING_PREFIX = "model."
COMPILE_PREFIX = "_orig_mod."
FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class WeightsError(HistoflowError, RuntimeError):
    """Pretrained weights that cannot be fetched or do not fit the model; the message says what to set."""


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear | nn.Conv2d]:
    """Dotted name and module of the classification head: the last nn.Linear, or the last nn.Conv2d where that
    comes later (SqueezeNet classifies with a 1x1 convolution)."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to use as classification head")
    return found[-1]


def _out_features(head: nn.Linear | nn.Conv2d) -> int:
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


def _set_head(model: nn.Module, num_classes: int) -> None:
    """Replace the head by a fresh one with num_classes outputs unless it already has them; num_classes=0: by the
    identity, so the model gives its pooled features (an encoder)."""
    name, head = classifier_head(model)
    if _out_features(head) == num_classes:
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if num_classes == 0:
        new: nn.Module = nn.Identity()
    elif isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        new = nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride, head.padding,
                        bias=head.bias is not None)
    # setattr also works for Sequential children ("classifier.6"), and on every supported torch version.
    setattr(parent, child, new)


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove prefix from the keys that carry it; keep the other keys as they are."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def clean_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The bare model state dict of a state dict or Lightning checkpoint (prefixes model./_orig_mod. removed)."""
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise ConfigError("checkpoint holds no state dict (expected a mapping of tensors or a 'state_dict' entry)")
    state_dict = _strip_prefix(state_dict, COMPILE_PREFIX)
    if any(k.startswith(LIGHTNING_PREFIX) for k in state_dict):
        # A LightningModule's state dict also holds e.g. a loss's class-weight buffer: keep only the model.
        model_keys = {k: v for k, v in state_dict.items() if k.startswith(LIGHTNING_PREFIX)}
        state_dict = _strip_prefix(model_keys, LIGHTNING_PREFIX)
    return _strip_prefix(state_dict, COMPILE_PREFIX)


def _load_into(model: nn.Module, checkpoint: Mapping[str, Any], source: str) -> None:
    """Load a checkpoint whose head may have any number of classes (e.g. ImageNet's 1000), or no head at all (an
    encoder's features only: the new head keeps its fresh initialisation), into model."""
    state_dict = clean_state_dict(checkpoint)
    head_name, _ = classifier_head(model)
    head_weight = state_dict.get(f"{head_name}.weight")
    if head_weight is not None:
        # Size the head like the file's so the whole file loads strictly; it is resized afterwards.
        _set_head(model, int(head_weight.shape[0]))
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise WeightsError(f"weights {source} do not fit model {type(model).__name__}: {err}") from err
    not_head = [k for k in missing if not k.startswith(f"{head_name}.")]
    if unexpected or not_head or (missing and head_weight is not None):
        raise WeightsError(f"weights {source} do not fit model {type(model).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected} (only the classification head {head_name} may be absent)")


def _torchvision_weights(name: str, weights: str) -> Any:
    """The torchvision weights enum member called weights ("IMAGENET1K_V1", "DEFAULT"...) for model name."""
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum.verify(weights)
    except (KeyError, ValueError) as err:
        valid = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ConfigError(
            f"model.weights='{weights}' is neither an existing file, an http(s) URL, nor a torchvision "
            f"weights name of '{name}' (one of: {valid})"
        ) from err


def _relu6_to_relu(model: nn.Module) -> None:
    """Every ReLU6 of a model replaced by a ReLU, in place."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(model, name, nn.ReLU(inplace=child.inplace))
        else:
            _relu6_to_relu(child)


def torchvision_model(
    name: str,
    num_classes: int,
    weights: str | None = None,
    freeze_backbone: bool = False,
    cache_dir: str | None = None,
    activation: str | None = None,
) -> nn.Module:
    """A torchvision model by name with a num_classes head; weights: None, torchvision name, file or URL.
    activation=relu: every ReLU6 becomes a ReLU (weights trained with ReLU, e.g. the quantisation-aware
    MobileNetV2 of ../shared/weights: torchvision's quantizable mobilenet_v2 in fp32 is exactly this)."""
    weights = None if weights is None else str(weights)
    if weights is None:
        model = torchvision.models.get_model(name, weights=None)
    elif weights.startswith(("http://", "https://")):
        model = torchvision.models.get_model(name, weights=None)
        # cache_dir None means torch's own cache ($TORCH_HOME/hub/checkpoints); either way it downloads once.
        checkpoint = torch.hub.load_state_dict_from_url(
            weights, model_dir=cache_dir, map_location="cpu", weights_only=True, progress=False
        )
        _load_into(model, checkpoint, weights)
    elif Path(weights).expanduser().is_file():
        model = torchvision.models.get_model(name, weights=None)
        path = Path(weights).expanduser()
        _load_into(model, read_weights_file(path), str(path))
    elif "/" in weights or "\\" in weights or weights.endswith(FILE_SUFFIXES):
        raise MissingInputError(f"model.weights file '{weights}' does not exist")
    else:
        member = _torchvision_weights(name, weights)
        try:
            # The builder, not get_state_dict(), so it also applies the weights' own settings (e.g. inception's).
            model = torchvision.models.get_model(name, weights=member)
        except OSError as err:  # URLError and other network/file failures
            raise WeightsError(
                f"could not download torchvision weights '{weights}' of '{name}' from {member.url} ({err}). "
                f"Without network, set model.weights=null for random initialisation, or download the file "
                f"elsewhere and set model.weights to its local path (or put it in $TORCH_HOME/hub/checkpoints)."
            ) from err
    _set_head(model, num_classes)
    if activation not in (None, "default", "relu"):
        raise WeightsError(f"model.activation={activation}: expected relu or null (the net's own activations)")
    if activation == "relu":
        _relu6_to_relu(model)
    if freeze_backbone and num_classes:
        _, head = classifier_head(model)
        head_params = {id(p) for p in head.parameters()}
        # BatchNorm running statistics still update in train mode; only gradients are switched off here.
        for param in model.parameters():
            param.requires_grad = id(param) in head_params
    return model
