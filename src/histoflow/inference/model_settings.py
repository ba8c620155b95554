"""The settings travel with the model: what a model sees (its encoder and weights, its windows, its classes) comes from
its checkpoint, and a command-line value that would change it is refused naming both values, before any work. What
does not change what it sees (workers, batch size, device, output folder, a moved weights file with the same
sha256: encoder.weights) may change."""

from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from histoflow.inference.fold_models import FoldModel
from histoflow.training.checkpoints import CheckpointError


def _encoder_name(model: FoldModel) -> str:
    encoder = model.config.get("encoder") or {}
    return str(encoder.get("name") or encoder.get("_target_") or "none (a net on patches)")


def refuse_encoder_change(given: Any, model: FoldModel) -> None:
    """predict.yaml's encoder section may only name where the same weights lie now (encoder.weights)."""
    if given is None:
        return
    if OmegaConf.is_config(given):
        given = OmegaConf.to_container(given, resolve=True)
    if not isinstance(given, dict):  # encoder=mobilenet_v2_imagenet
        raise CheckpointError(f"encoder={given}, but {model.path} was trained on encoder {_encoder_name(model)}: "
                              "a head reads the features of the encoder it was trained on. Fix: leave encoder= out "
                              "(the checkpoint names it), or predict with a model trained on that encoder")
    other = {k: v for k, v in given.items() if k != "weights" and v is not None}
    if other:
        trained = model.config.get("encoder") or {}
        said = ", ".join(f"encoder.{k}={v} (trained: {trained.get(k)})" for k, v in other.items())
        raise CheckpointError(f"{said}: {model.path} was trained on encoder {_encoder_name(model)} as its checkpoint "
                              "says. Fix: leave these out; only encoder.weights (where the same weights file lies "
                              "now, checked by its sha256) may be given")


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
