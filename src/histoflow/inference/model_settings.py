"""The settings travel with the model: what a model sees comes from its checkpoint, and a command-line value that
would change it is refused naming both values, before any work. The one place that refuses such changes, for images
and for slides:

- the encoder (refuse_encoder_change): a head reads the features of the encoder it was trained on; only
  encoder.weights (where the same weights file lies now, checked by its sha256) may be given;
- images (refuse_changes): the classes of every fold model, grid.size, and for a head on image bags grid.stride
  and tta;
- slides (refuse_slide_changes): the tiling (data.slide of the checkpoint: slide.mpp, slide.tile_size, the tissue
  settings); then check_settings compares the settings that key the new cohort's features with those the model's
  features were keyed by (its encoder weights' sha256 among them).

May change: workers, batch size, device, progress, the output folder; for slides also slide.backend (it only reads
the tiles), slide.batch_size, slide.num_workers, export and the `features` section (where the features go,
devices, chunks).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import to_builtin
from histoflow.features.cohort_job import DECIDING
from histoflow.inference.fold_models import BagHeadModel, FoldModel
from histoflow.slides.tiling import TilingConfig
from histoflow.training.checkpoints import CheckpointError

PACE = ("backend", "batch_size", "num_workers", "progress")  # slide keys that do not change a tile's pixels


def _encoder_name(encoder: Mapping[str, Any]) -> str:
    return str(encoder.get("name") or encoder.get("_target_") or "none (a net on patches)")


def refuse_encoder_change(given: Any, model: FoldModel | BagHeadModel) -> None:
    """predict.yaml's encoder section may only name where the same weights lie now (encoder.weights): another
    encoder (encoder=<name>), or any other encoder key, is a CheckpointError naming both values (the trained one
    from the checkpoint)."""
    if given is None:
        return
    trained = model.config.get("encoder") or {}
    if OmegaConf.is_config(given):
        given = to_builtin(given)
    if not isinstance(given, Mapping):  # encoder=mobilenet_v2_imagenet
        raise CheckpointError(f"encoder={given}, but {model.path} was trained on encoder {_encoder_name(trained)}: "
                              "a head reads the features of the encoder it was trained on. Fix: leave encoder= out "
                              "(the checkpoint names it), or predict with a model trained on that encoder")
    differ = {k: v for k, v in given.items() if k != "weights" and v is not None}
    if differ:
        said = ", ".join(f"encoder.{k}={v} (trained: {trained.get(k)})" for k, v in differ.items())
        raise CheckpointError(f"{said}: {model.path} was trained on the features of encoder "
                              f"{_encoder_name(trained)}, as its checkpoint says. Fix: leave these out; only "
                              "encoder.weights (where the same weights file lies now, checked by its sha256) may be "
                              "given")


def refuse_changes(cfg: DictConfig, models: Sequence[FoldModel]) -> None:
    """Refuse, naming both values, a command line that would change what the models see; and bag heads where they
    cannot run (a head on image bags given slides; the k-fold report, written from their fold predictions)."""
    first = models[0]
    mixed = [m for m in models if m.is_bag != first.is_bag]
    if mixed:
        raise CheckpointError(f"{first.path} and {mixed[0].path}: a head on bags and a model of patches cannot be "
                              "averaged. Fix: predict with each separately")
    for m in models:
        refuse_encoder_change(cfg.get("encoder"), m)
        if m.classes != first.classes:
            raise CheckpointError(f"{m.path} was trained on classes {m.classes}, {first.path} on {first.classes}: "
                                  "their probabilities cannot be averaged. Fix: predict with models of one class list")
    trained = dict(first.config["data"].get("patches") or {})
    grid = cfg.get("grid") or {}
    if grid.get("size") is not None and grid.get("size") != trained.get("size"):
        raise CheckpointError(f"grid.size={grid.get('size')}, but {first.path} was trained on {trained.get('size')}-px "
                              f"windows (data.patches.size). Fix: leave grid.size out (the checkpoint gives it)")
    if not first.is_bag:
        return
    if cfg.get("slides"):
        raise CheckpointError(f"{first.path}: a head on image bags (bags of an image's windows) predicts images, not "
                              "slides. Fix: pass images=<folder | list>; for slides, train a head on slide or patient "
                              "bags (experiment=slides_abmil), whose multirun predicts slides=<table>")
    if cfg.get("images") is None:
        raise CheckpointError(f"{first.path}: a head on bags; its multirun's k-fold report is written from each fold's "
                              "bag_predictions.csv when the multirun ends (inference.bag_report.write_bag_report). "
                              "Fix: pass images=<folder | list> to predict new images")
    if grid.get("stride") is not None and grid.get("stride") != trained.get("stride"):
        raise CheckpointError(f"grid.stride={grid.get('stride')}, but {first.path}'s bags were cut every "
                              f"{trained.get('stride')} px (data.patches.stride): another stride makes other bags. "
                              "Fix: leave grid.stride out")
    if cfg.get("tta"):
        raise CheckpointError(f"tta={cfg.get('tta')}: {first.path}'s bags hold the rotations training cut "
                              f"({trained.get('rotations')}); test-time views would change them. Fix: tta=false")


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


def refuse_slide_changes(cfg: DictConfig, model: BagHeadModel) -> None:
    """A tiling key or an encoder given on the command line that differs from the model's: CheckpointError naming
    both values and the fix."""
    trained = model.tiling
    changed = [(k, cfg.slide.get(k), trained.get(k)) for k in sorted(given_slide_keys(cfg))
               if cfg.slide.get(k) != trained.get(k)]
    if changed:
        said = ", ".join(f"slide.{k}={given} (trained: {was})" for k, given, was in changed)
        raise CheckpointError(f"{said}: {model.path} was trained on tiles cut that way (its data.slide); other tiles "
                              "are other bags. Fix: leave these keys out (the checkpoint gives them)")
    refuse_encoder_change(cfg.get("encoder"), model)


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
