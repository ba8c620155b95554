"""How a pretrained model wants its input (side, interpolation, mean, std), so that no user copies an encoder's
normalisation by hand.

A model config may carry a `preprocess` section; each value is `auto` (from the weights' own config: timm's
pretrained config, or a torchvision weights name's transforms) or given. The values become the data loader's
`resize`, `interpolation` and `normalize=fixed` with `mean`/`std`, for training, embedding and prediction alike.
Only the resize and the normalisation are taken: patches are already cut, so timm's crop_pct has no part here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from histoflow.common.config import check_keys, to_builtin
from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.models.timm_models import pretrained_data_config

AUTO = "auto"
KEYS = ("input_size", "interpolation", "mean", "std")
TIMM_TARGET = "histoflow.models.timm_model"
TORCHVISION_TARGET = "histoflow.models.torchvision_model"


@dataclass(frozen=True)
class Preprocess:
    """A model's input: crops resized to input_size (None: as cut), then (x / 255 - mean) / std (None: the data's)."""

    input_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def loader(self) -> dict[str, Any]:
        """The data.loader values it sets."""
        out: dict[str, Any] = {"resize": self.input_size, "interpolation": self.interpolation}
        if self.mean is not None:
            out.update(normalize="fixed", mean=list(self.mean), std=list(self.std))
        return out


def _torchvision_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The data config of a torchvision weights name (IMAGENET1K_V1, DEFAULT) from its inference transforms."""
    import torchvision

    weights = model_cfg.get("weights")
    try:
        member = torchvision.models.get_model_weights(model_cfg["name"]).verify(str(weights))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"model.preprocess: `auto` needs weights that say how they want their input (a timm "
                          f"model, or a torchvision weights name); model.weights={weights} does not. Fix: give "
                          f"model.preprocess.input_size, interpolation, mean and std") from err
    transforms = member.transforms()
    return {"input_size": transforms.crop_size[0], "interpolation": transforms.interpolation.value,
            "mean": tuple(transforms.mean), "std": tuple(transforms.std)}


def _pretrained_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    target = str(model_cfg.get("_target_", ""))
    if target == TIMM_TARGET:
        return pretrained_data_config(str(model_cfg["name"]))
    if target == TORCHVISION_TARGET:
        return _torchvision_config(model_cfg)
    raise ConfigError(f"model.preprocess: `auto` is known for timm and torchvision models only, not {target}. "
                      "Fix: give model.preprocess.input_size, interpolation, mean and std")


def model_preprocess(model_cfg: Mapping[str, Any] | None, section: str = "model") -> Preprocess | None:
    """The Preprocess of a model config's `preprocess` section; None when it has none (the data's loader rules)."""
    if model_cfg is None:
        return None
    model_cfg = to_builtin(model_cfg)
    given = model_cfg.get("preprocess")
    if not given:
        return None
    check_keys(given, KEYS, f"{section}.preprocess")
    auto = {k: v for k, v in given.items() if v == AUTO}
    try:
        pretrained = _pretrained_config(model_cfg) if auto else {}
    except HistoflowError as e:  # the builders name their keys model.*; an encoder's are encoder.*
        if section == "model":
            raise
        raise type(e)(re.sub(r"\bmodel\.(name|weights|pretrained|preprocess)\b", rf"{section}.\1", str(e))) from e
    values = {k: pretrained.get(k) if v == AUTO else v for k, v in given.items()}
    size = values.get("input_size")
    if isinstance(size, (list, tuple)):  # timm's (channels, height, width)
        if size[-1] != size[-2]:
            raise ConfigError(f"{section}.preprocess.input_size={tuple(size)}: square inputs only here")
        size = size[-1]
    mean, std = values.get("mean"), values.get("std")
    if (mean is None) != (std is None):
        raise ConfigError(f"{section}.preprocess: give both mean and std, or neither (mean={mean}, std={std})")
    return Preprocess(input_size=None if size is None else int(size),
                      interpolation=str(values.get("interpolation") or "bilinear"),
                      mean=None if mean is None else tuple(float(m) for m in mean),
                      std=None if std is None else tuple(float(s) for s in std))


def input_preprocess(model_cfg: Mapping[str, Any] | None, encoder_cfg: Mapping[str, Any] | None = None
                     ) -> dict[str, Any] | None:
    """The data.loader values of what the patches go into: a frozen encoder's input where it says how it wants it,
    else the model's; None where neither does (the data's loader settings rule)."""
    chosen = (model_preprocess(encoder_cfg, "encoder") if encoder_cfg else None) or model_preprocess(model_cfg)
    return chosen.loader() if chosen else None
