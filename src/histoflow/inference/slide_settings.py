"""The settings of a slide- or patient-bag model travel with it: new slides are tiled and embedded as its training
cohort was (the checkpoint's data.slide and encoder, the encoder's weights checked by sha256), and a command-line
value that would change what the model sees is refused naming both values, before any slide is read.

May change: slide.backend (it only reads the tiles), slide.batch_size, num_workers, progress, export, the
`features` section (where the features go, devices, chunks), encoder.weights (where the same weights file lies now:
its sha256 must be the trained one), device and the output folder.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import to_builtin
from histoflow.features.cohort_job import DECIDING
from histoflow.inference.bag_heads import BagHeadModel
from histoflow.slides.tiling import TilingConfig
from histoflow.training.checkpoints import CheckpointError

PACE = ("backend", "batch_size", "num_workers", "progress")  # slide keys that do not change a tile's pixels


def given_slide_keys(cfg: DictConfig) -> set[str]:
    """The tiling keys the command line gives: those whose value is not conf/slide's default, and where Hydra ran,
    those its overrides name (a default value given explicitly)."""
    default = TilingConfig()
    said = {k for k in DECIDING if cfg.slide.get(k) != getattr(default, k)}
    if HydraConfig.initialized():
        for override in HydraConfig.get().overrides.task:
            key = override.split("=", 1)[0].lstrip("+~")
            if key.startswith("slide."):
                said.add(key.removeprefix("slide."))
    return said & set(DECIDING)


def refuse_changes(cfg: DictConfig, model: BagHeadModel) -> None:
    """A tiling key or an encoder given on the command line that differs from the model's: CheckpointError naming
    both values and the fix."""
    trained = model.tiling
    changed = [(k, cfg.slide.get(k), trained.get(k)) for k in sorted(given_slide_keys(cfg))
               if cfg.slide.get(k) != trained.get(k)]
    if changed:
        said = ", ".join(f"slide.{k}={given} (trained: {was})" for k, given, was in changed)
        raise CheckpointError(f"{said}: {model.path} was trained on tiles cut that way (its data.slide); other tiles "
                              "are other bags. Fix: leave these keys out (the checkpoint gives them)")
    given = cfg.get("encoder")
    encoder = to_builtin(given) if OmegaConf.is_config(given) else dict(given or {})
    other = {k: v for k, v in encoder.items() if k != "weights" and v is not None}
    trained_encoder = model.config.get("encoder") or {}
    differ = {k: v for k, v in other.items() if to_builtin(v) != to_builtin(trained_encoder.get(k))}
    if differ:
        said = ", ".join(f"encoder.{k}={v} (trained: {trained_encoder.get(k)})" for k, v in differ.items())
        raise CheckpointError(f"{said}: {model.path}'s head reads the features of encoder "
                              f"{trained_encoder.get('name') or trained_encoder.get('_target_')}. Fix: leave the "
                              "encoder out (the checkpoint names it); only encoder.weights (where the same weights "
                              "file lies now) may be given")


def model_tiling(cfg: DictConfig, model: BagHeadModel) -> dict[str, Any]:
    """The slide section of the cohort's embedding: the trained tiling, with this run's pace keys."""
    pace = {k: cfg.slide.get(k) for k in PACE if cfg.slide.get(k) is not None}
    return {**{k: v for k, v in model.tiling.items() if k not in ("batch_size", "num_workers", "progress")}, **pace}


def model_encoder(cfg: DictConfig, model: BagHeadModel) -> dict[str, Any]:
    """The trained encoder's config, with encoder.weights where the same weights lie now."""
    weights = (cfg.get("encoder") or {}).get("weights")
    encoder = dict(model.config["encoder"])
    return {**encoder, "weights": str(weights)} if weights else encoder


def check_settings(settings: Mapping[str, Any], model: BagHeadModel) -> None:
    """The settings this cohort's features are keyed by must be the model's (the encoder config, its weights'
    sha256, its input, the tiling): CheckpointError naming each that differs, both values."""
    if not model.cohort:  # a checkpoint from before the settings were kept: its config alone was compared
        return
    differ = _differences(dict(settings), model.cohort)
    if differ:
        said = "; ".join(f"{k}: {new} (trained: {old})" for k, new, old in differ)
        raise CheckpointError(f"{said}: {model.path}'s features were made otherwise (its checkpoint's cohort "
                              "settings). Fix: leave these out, or point encoder.weights at the file it was trained "
                              "with (the same sha256)")


def _differences(new: Any, old: Any, where: str = "") -> Sequence[tuple[str, Any, Any]]:
    if isinstance(new, Mapping) and isinstance(old, Mapping):
        return [d for k in sorted(set(new) | set(old))
                for d in _differences(new.get(k), old.get(k), f"{where}.{k}" if where else str(k))]
    return [] if new == old else [(where, new, old)]
