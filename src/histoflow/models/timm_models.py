"""Any timm model by name (`timm.create_model`), pretrained from the hub or a local file, its head sized to the data.

Names are timm's (`resnet18`, `vit_small_patch16_224.augreg_in21k`, ...) or `hf-hub:org/name` (pathology foundation
models such as UNI, Virchow2 or H-optimus-0 are published so). Pretrained weights come from the Hugging Face hub;
where the hub cannot be reached the build fails at once, saying how to use a local file instead, and never waits on
the network.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from torch import nn

from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.models.torchvision_models import WeightsError, clean_state_dict
from histoflow.models.weights_file import read_weights_file

HUB_PREFIX = "hf-hub:"
HUB_ENDPOINT = "https://huggingface.co"  # huggingface_hub's default; HF_ENDPOINT overrides it, as there
HUB_TIMEOUT_S = 3.0


def _offline_fix(name: str) -> str:
    arch = "the architecture's timm name (e.g. vit_large_patch16_224 with model.kwargs) and " if name.startswith(
        HUB_PREFIX) else ""
    return (f"Fix: where a network exists, fetch the weights once (python -c \"import timm; timm.create_model("
            f"'{name}', pretrained=True)\", or huggingface-cli download), copy the weights file here and set "
            f"{arch}model.weights=<file> (encoder.weights for an encoder); or set model.pretrained=false for random "
            "initialisation")


def check_hub(name: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Fail at once, with the fix, when the hub that holds the weights of `name` cannot be reached.

    With HF_HUB_OFFLINE set, huggingface_hub reads its local cache only and never connects: nothing to check.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = os.environ.get("HF_ENDPOINT", HUB_ENDPOINT)
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise WeightsError(f"model.name={name}: its pretrained weights come from the Hugging Face hub ({endpoint}), "
                           f"which cannot be reached from here ({err}). {_offline_fix(name)}") from err


def _timm():
    import timm  # here, not at module level: importing timm costs a second that models without it need not pay

    return timm


def pretrained_data_config(name: str) -> dict[str, Any]:
    """timm's data config of a model's pretrained weights: input_size (3, H, W), interpolation, mean, std, crop_pct."""
    timm = _timm()
    if name.startswith(HUB_PREFIX):
        check_hub(name)
        config, _ = timm.models.load_model_config_from_hf(name[len(HUB_PREFIX):])
        pretrained_cfg = config.get("pretrained_cfg", config)
    else:
        cfg = timm.get_pretrained_cfg(name)
        if cfg is None:
            raise ConfigError(f"model.name={name}: not a timm model with a pretrained config "
                              "(timm.list_models() lists the names; give model.preprocess values instead)")
        pretrained_cfg = cfg.to_dict()
    return timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Dotted prefixes of a timm model's classifier ("fc", "head", "head.fc"...), from its pretrained config."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))


def load_weights_file(model: nn.Module, path: Path) -> None:
    """A state dict file (.pth/.bin/.safetensors; a training checkpoint too) into model; its classifier may have
    another number of classes or be absent (an encoder's features only): the model's own head is kept then.
    Every other key must fit, so a file of another architecture fails instead of leaving the model random."""
    state = clean_state_dict(read_weights_file(path))
    heads = head_prefixes(model)
    own = model.state_dict()
    # a head of another size (ImageNet's 1000 classes) or a head the model does not have (num_classes=0) is dropped
    state = {k: v for k, v in state.items()
             if not (k.startswith(heads) and (k not in own or own[k].shape != v.shape))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise WeightsError(f"weights {path} do not fit timm model {type(model).__name__}: {err}") from err
    not_head = [k for k in missing if not k.startswith(heads)]
    if unexpected or not_head:
        raise WeightsError(f"weights {path} do not fit timm model {type(model).__name__}: missing keys "
                           f"{not_head[:8]}{'...' if len(not_head) > 8 else ''}, unexpected keys {unexpected[:8]}"
                           f"{'...' if len(unexpected) > 8 else ''} (only the classifier {list(heads)} may differ)")


def timm_model(name: str, num_classes: int, pretrained: bool = False, weights: str | None = None,
               freeze_backbone: bool = False, kwargs: Mapping[str, Any] | None = None,
               cache_dir: str | None = None) -> nn.Module:
    """timm.create_model(name, num_classes=...), pretrained from the hub (pretrained=true) or from a local file
    (weights=PATH, which wins); num_classes=0: no head, the pooled features (an encoder)."""
    timm = _timm()
    path = None
    if weights is not None:
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise MissingInputError(f"model.weights file '{weights}' does not exist")
        if name.startswith(HUB_PREFIX):
            check_hub(name)  # the architecture itself comes from the hub's config.json
    elif pretrained:
        check_hub(name)
    try:
        model = timm.create_model(name, pretrained=bool(pretrained) and path is None, num_classes=num_classes,
                                  cache_dir=cache_dir, **dict(kwargs or {}))
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"model.name={name}: {err}; timm.list_models('pattern*') lists the names") from err
        raise
    except OSError as err:  # the hub failed after the check (a cache miss with HF_HUB_OFFLINE, a dropped connection)
        raise WeightsError(f"model.name={name}: could not fetch its pretrained weights ({err}). "
                           f"{_offline_fix(name)}") from err
    if path is not None:
        load_weights_file(model, path)
    if freeze_backbone:
        head = {id(p) for p in model.get_classifier().parameters()} if num_classes else set()
        for param in model.parameters():
            param.requires_grad = id(param) in head
    return model
