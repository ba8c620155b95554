"""Trained models for prediction: find the fold checkpoints of a run, load them safely, rebuild their preprocessing.

A checkpoint is read with torch.load(weights_only=True), so it cannot run pickled code, and the net
is rebuilt from the config stored in it only when every `_target_` there is on a trusted list
(training/checkpoints.py load_classifier: the one loader of patch models, heads on an encoder and heads on bags).
A head on slide or patient bags is loaded alone (BagHeadModel): its encoder runs once, in the cohort's embedding
(features/cohort.py); its checkpoint keeps the full training config (encoder, data.slide: the tiling, classes) and,
from the bag DataModule, the cohort settings that keyed its features (the encoder's weights' sha256 among them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from histoflow.common.config import local_file
from histoflow.data.prepare import prepare_dataset
from histoflow.data.stain import StainNormalizer
from histoflow.data.targets import TaskConfig
from histoflow.data.transforms import PatchTransform, build_transform
from histoflow.features.embeddings import weights_sha256
from histoflow.inference.voting import EncoderGroup
from histoflow.models import is_bag_head
from histoflow.training.checkpoints import (
    TRUSTED_TARGETS,
    CheckpointError,
    UntrustedCheckpoint,
    load_classifier,
    load_net,
    read_checkpoint,
)
from histoflow.training.module import PatchClassifier
from histoflow.training.outputs import METRICS_FILE, job_order

log = logging.getLogger(__name__)
DATAMODULE_STATE = "ShardDataModule"  # Lightning saves the datamodule's state_dict() under its class name
BAG_DATAMODULE_STATE = "BagDataModule"  # a bag head's (features/bags.py), a ShardDataModule with its bag section
SLIDE_BAG_STATE = "SlideBagDataModule"  # a head on slide or patient bags (features/slide_bags.py): its cohort settings


def datamodule_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The prepared data's state a checkpoint keeps (patch or bag DataModule): loader, statistics, stain, encoder."""
    return checkpoint.get(DATAMODULE_STATE) or checkpoint.get(BAG_DATAMODULE_STATE)


@dataclass
class FoldModel:
    """One trained model ready to predict: its net, its evaluation transform and what it was trained on."""

    path: Path
    fold: str
    classes: list[str]
    net: nn.Module
    transform: PatchTransform
    config: dict[str, Any]  # the full resolved training config
    # a head on a frozen encoder: what decides the encoder's features (its embeddings folder: encoder config, weights
    # sha256, input preprocessing, prepared data); fold models with the same key share one encoder pass
    encoder_key: str | None = None

    @property
    def patch_size(self) -> int:
        """Side of the windows the transform expects (the training patch side)."""
        return self.transform.side

    @property
    def is_bag(self) -> bool:
        """A head on bags (ABMIL, mean or max pooling): one prediction per bag of window features."""
        return is_bag_head(self.config.get("model") or {})

    @property
    def task(self) -> TaskConfig:
        """What its head learned: classes, a survival risk or a regression value (the training config's task)."""
        return TaskConfig.from_config(self.config.get("task"))

    @property
    def encoder(self) -> nn.Module:
        """The frozen encoder of a head (the identity before a whole net)."""
        return self.net.encoder if self.encoder_key else nn.Identity()

    @property
    def head(self) -> nn.Module:
        """What reads the encoder's output: the head, or the whole net."""
        return self.net.head if self.encoder_key else self.net


def encoder_groups(models: Sequence[FoldModel], share: bool = True) -> list[EncoderGroup]:
    """The models grouped by their frozen encoder (same encoder_key: weights, config, preprocessing), so that it
    runs once per window for all their heads; a whole net is a group of its own. share=False: one group a model
    (each head through its own encoder: the slower path, kept for benchmarks)."""
    groups: dict[object, EncoderGroup] = {}
    for i, m in enumerate(models):
        key = m.encoder_key if share and m.encoder_key else ("alone", i)
        if key in groups:
            groups[key].heads.append(m.head)
        else:
            groups[key] = EncoderGroup(m.encoder, [m.head], m.transform)
    return list(groups.values())


def _best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a finished training run tested: `best_checkpoint` of its metrics file."""
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    best = metrics.get("best_checkpoint")
    if best:
        for candidate in (Path(best), run_dir / "checkpoints" / Path(best).name):  # the run folder may have moved
            if candidate.is_file():
                return candidate
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.warning("%s names no existing best checkpoint (%s): using %s", run_dir / METRICS_FILE, best, last)
        return last
    raise CheckpointError(f"{run_dir}: its best checkpoint {best} is missing and there is no checkpoints/last.ckpt. "
                          "Fix: pass ckpt_path=<a .ckpt file>")


def find_checkpoints(ckpt_path: str | Path) -> list[Path]:
    """The checkpoint files of a .ckpt path, a training run folder, or a multirun folder (one per job, in job order)."""
    path = Path(ckpt_path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such file or folder. Fix: pass a .ckpt file, a training "
                              "run folder or a multirun folder (histoflow train -m fold=1,2,3,4,5)")
    if (path / METRICS_FILE).is_file():
        return [_best_checkpoint(path)]
    jobs = sorted(path.glob(f"*/{METRICS_FILE}"), key=job_order)
    unfinished = sorted(d for d in path.iterdir() if (d / ".hydra").is_dir() and not (d / METRICS_FILE).is_file())
    if unfinished:
        log.warning("jobs without %s (not finished) left out: %s", METRICS_FILE, ", ".join(map(str, unfinished)))
    if not jobs:
        raise CheckpointError(f"{path}: no finished training run here (no {METRICS_FILE} in it or its sub-folders). "
                              "Fix: pass a .ckpt file or the folder that train.py wrote")
    return [_best_checkpoint(j.parent) for j in jobs]


def models_by_fold(members: Sequence[Sequence[FoldModel]]) -> dict[str, list[FoldModel]]:
    """Each held-out fold's models, one from every ensemble member (each a run or a multirun over the folds).

    Within a member, a fold held out twice means a multirun over more than folds (a sweep of settings, whose
    models should not be averaged); members must hold out the same folds, so that every fold's ensemble is whole.
    """
    by_fold: dict[str, list[FoldModel]] = {}
    first = sorted({m.fold for m in members[0]})
    for i, models in enumerate(members):
        seen: dict[str, FoldModel] = {}
        for m in models:
            if m.fold in seen:
                raise CheckpointError(f"{m.path} and {seen[m.fold].path} both hold out fold {m.fold}: a multirun over "
                                      "more than folds. Fix: pass one job's folder, or a multirun of folds only (a "
                                      "list ckpt_path=[a,b] averages several such multiruns fold by fold)")
            seen[m.fold] = m
            by_fold.setdefault(m.fold, []).append(m)
        if sorted(seen) != first:
            raise CheckpointError(f"ckpt_path entry {i + 1} (with {models[0].path}) holds out folds {sorted(seen)}, "
                                  f"the first entry folds {first}. Fix: give every entry the same folds (finish the "
                                  "missing jobs, or leave that entry out)")
    return by_fold


def preprocessing_of(module: PatchClassifier, datamodule_state: Mapping[str, Any] | None = None) -> PatchTransform:
    """The evaluation transform a model was trained with: centre crop, normalised by its training fold's statistics.

    Sources, first found: the datamodule state Lightning saved in the checkpoint; the prepared data set of the
    training config (prepared again, identically, when it is gone).
    """
    hparams = module.hparams
    data = hparams["config"]["data"]
    loader = dict(data.get("loader") or {})
    if datamodule_state and "stats" in datamodule_state:
        loader.update(datamodule_state.get("loader") or {})
        stats, stain = datamodule_state["stats"], datamodule_state.get("stain")
    else:
        prepared = prepare_dataset(data, quiet=True)
        stats, stain = prepared.stats(hparams["config"]["fold"]), prepared.stain
    return build_transform(loader, stats, train=False, stain=StainNormalizer.from_state(stain))


def check_encoder_weights(path: Path, encoder: Mapping[str, Any] | None, state: Mapping[str, Any] | None,
                          weights: str | None = None) -> str | None:
    """A head's checkpoint holds the head only: its encoder is rebuilt from the encoder config, whose weights file
    must still be the one the head was trained on. `weights` (predict.yaml's encoder.weights) names that file where
    the checkpoint's path no longer leads; it is checked against the sha256 kept. Returns the file to build from."""
    embedded = (state or {}).get("encoder") or {}
    trained, kept = embedded.get("weights_sha256"), (encoder or {}).get("weights")
    if not trained or (kept is None and weights is None):
        return weights
    given = local_file(str(weights if weights is not None else kept))
    file = Path(given).expanduser()
    if not file.is_file():
        where = "encoder.weights" if weights is not None else "its checkpoint's encoder weights"
        raise CheckpointError(f"{path}: its head was trained on the features of encoder weights {kept}; {where} "
                              f"{given} is not there. Fix: pass encoder.weights=<that file> (checked against the "
                              f"sha256 kept, {trained[:12]}...), or put it back where it was")
    if weights_sha256(file, Path(embedded["embeddings"]).parent) != trained:
        raise CheckpointError(f"{path}: the encoder weights {file} are not those its head was trained on (sha256 "
                              f"{trained[:12]}... then). Fix: restore those weights (or name them with "
                              "encoder.weights=), or train the head again")
    return str(file)


def load_fold_model(path: str | Path, trusted: Iterable[str] = TRUSTED_TARGETS,
                    encoder_weights: str | None = None) -> FoldModel:
    """A checkpoint as a FoldModel on the CPU, in eval mode, after checking its config may be instantiated; a head's
    encoder from `encoder_weights` where given (checked against the sha256 its head was trained with)."""
    path = Path(path)
    checkpoint = read_checkpoint(path)  # read once: the classifier is built from these contents
    hparams = checkpoint["hyper_parameters"]
    config = hparams["config"]
    state = datamodule_state(checkpoint)
    weights = check_encoder_weights(path, config.get("encoder"), state, encoder_weights)
    try:
        module = load_classifier(path, trusted, checkpoint=checkpoint, encoder_weights=weights)
    except UntrustedCheckpoint as e:
        raise CheckpointError(str(e)) from e
    transform = preprocessing_of(module, state)
    if hparams["input_size"] and transform.out_side != hparams["input_size"]:
        raise CheckpointError(f"{path}: the net takes {hparams['input_size']}-px inputs but its preprocessing makes "
                              f"{transform.out_side} px. Fix: retrain, or use a checkpoint whose data.loader.crop "
                              "(and resize) match")
    embedded = (state or {}).get("encoder") or {}
    key = str(embedded.get("embeddings")) if config.get("encoder") and embedded.get("embeddings") else None
    return FoldModel(path, str(config["fold"]), list(hparams["classes"]), module.model.eval(), transform, config, key)


def check_compatible(models: list[FoldModel], classes: list[str] | None, window: int, where: str) -> None:
    """Fail, naming the checkpoint, when a model's classes or input patch side differ from the data's."""
    for m in models:
        if classes is not None and m.classes != list(classes):
            raise CheckpointError(f"{m.path}: trained on classes {m.classes}, but {where} has {list(classes)}. "
                                  "Fix: predict with a model trained on these classes (same names, same order)")
        if m.patch_size != window:
            raise CheckpointError(f"{m.path}: trained on {m.patch_size}-px patches, but the grid cuts {window}-px "
                                  f"windows. Fix: set grid.size={m.patch_size} (or null, the training size)")


@dataclass
class BagHeadModel:
    """One fold's head on slide or patient bags, with what it was trained on."""

    path: Path
    fold: str
    classes: list[str]
    head: nn.Module
    config: dict[str, Any]  # the full resolved training config
    level: str  # slide | patient
    cohort: dict[str, Any]  # the cohort settings of its features ({} for a checkpoint older than they are kept)

    @property
    def tiling(self) -> dict[str, Any]:
        """data.slide of its training: how its slides were cut into tiles."""
        return dict(self.config["data"].get("slide") or {})

    @property
    def task(self) -> TaskConfig:
        """What its head learned: classes, a survival risk or a regression value (the training config's task)."""
        return TaskConfig.from_config(self.config.get("task"))


def is_slide_bag_checkpoint(path: str | Path) -> bool:
    """Whether ckpt_path's first checkpoint is a head on slide or patient bags (data=slides)."""
    config = read_checkpoint(find_checkpoints(path)[0])["hyper_parameters"]["config"]
    return is_bag_head(config.get("model") or {}) and str(config["data"].get("_target_", "")).endswith(
        SLIDE_BAG_STATE)


def load_bag_head(path: Path, trusted: Iterable[str] = TRUSTED_TARGETS) -> BagHeadModel:
    """A head on slide or patient bags from its checkpoint, without its encoder (load_net, with_encoder=False: a
    classifier's, or a survival or regression head's); CheckpointError naming the file where it is none or not
    trusted."""
    checkpoint = read_checkpoint(path)
    config = checkpoint["hyper_parameters"]["config"]
    if not is_bag_head(config.get("model") or {}):
        raise CheckpointError(f"{path}: not a head on bags (model {config['model'].get('_target_')}): slide tables "
                              "with a patch model are predicted as maps (slides=<files>, docs/prediction.md)")
    try:
        head = load_net(path, trusted, checkpoint=checkpoint, with_encoder=False)
    except UntrustedCheckpoint as e:
        raise CheckpointError(str(e)) from e
    state = checkpoint.get(SLIDE_BAG_STATE) or {}
    level = str((state.get("bag") or config.get("bag") or {}).get("level", "slide"))
    classes = list(checkpoint["hyper_parameters"]["classes"])
    return BagHeadModel(path, str(config["fold"]), classes, head.eval(), config, level,
                        dict(state.get("cohort") or {}))


def load_bag_heads(ckpt_path: str | Path, trusted: Iterable[str] = TRUSTED_TARGETS) -> list[BagHeadModel]:
    """Every fold's head of a multirun (or the one of a run or .ckpt); heads that differ in classes, bag level,
    encoder or tiling cannot be averaged and are refused naming both checkpoints."""
    models = [load_bag_head(p, trusted) for p in find_checkpoints(ckpt_path)]
    first = models[0]
    for m in models[1:]:
        for what, mine, theirs in (("classes", m.classes, first.classes), ("bag.level", m.level, first.level),
                                   ("encoder and tiling (cohort settings)", m.cohort, first.cohort)):
            if mine != theirs:
                raise CheckpointError(f"{m.path} was trained with {what} {mine}, {first.path} with {theirs}: their "
                                      "probabilities cannot be averaged. Fix: predict with the fold models of one "
                                      "training multirun")
    return models
