"""One training run: fit on the training part of a fold, keep the best epoch by validation, test it."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger

from histoflow.common.config import localize_weights, refuse_unknown_top_keys
from histoflow.common.errors import ConfigError
from histoflow.evaluation.figures import plot_training_curves
from histoflow.features.bag_targets import task_of
from histoflow.features.embeddings import Embedder
from histoflow.models import input_preprocess, is_bag_head
from histoflow.models.build import build_net, require_head
from histoflow.training.bag_outputs import write_bag_outputs
from histoflow.training.callbacks import FlushLogs, refuse_shared_state, without_unranked_best
from histoflow.training.module import BagClassifier, PatchClassifier
from histoflow.training.outputs import METRICS_FILE, merge_csv_metrics
from histoflow.training.resume import ddp_children_rerun_this_job, resume_checkpoint
from histoflow.training.target_outputs import write_target_outputs
from histoflow.training.task_module import BagTargetModule
from histoflow.training.tracking import configure_wandb, finish_wandb

log = logging.getLogger(__name__)
# Lightning 2.6 on torch >= 2.10 asks torch a deprecated question at every fit and test; the notice is Lightning's
# to act on, not the user's, and it came twice a run
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
def _write_reports(trainer: pl.Trainer, output_dir: Path) -> None:
    """All of this run's metrics in <run>/metrics.csv and its curves in <run>/training_curves.png."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            merged = merge_csv_metrics(Path(logger.root_dir), output_dir / "metrics.csv")
            if merged is not None:
                plot_training_curves(merged, output_dir / "training_curves.png")


def bag_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the k-fold report of bag heads says it ran: the head (its aggregate), window and stride."""
    patches, slide = cfg.data.get("patches") or {}, cfg.data.get("slide") or {}  # images | slides (data=slides)
    window = patches.get("size") or slide.get("tile_size")
    model = str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1]
    return {"aggregate": f"bag ({model}, {(cfg.get('bag') or {}).get('level', 'image')} bags)", "views": 1,
            "window": window, "stride": patches.get("stride") or slide.get("stride") or window,
            "mpp": slide.get("mpp")}


def bag_data(cfg: DictConfig) -> dict[str, Any]:
    """What a bag head adds to the data config: the bag section, and the DataModule of its bags, which the data config
    names in `bag_target` (conf/data: BagDataModule for prepared images, the same preparation and embedding;
    SlideBagDataModule for data=slides, whose samples are bags already)."""
    target = cfg.data.get("bag_target")
    if not target:
        raise ConfigError(f"data={cfg.data.get('name')} names no DataModule for bags, which a head on bags "
                          f"(model={str(cfg.model.get('_target_', '')).rsplit('.', 1)[-1]}) trains on. Fix: add "
                          "`bag_target: histoflow.features.bags.BagDataModule` to the data config (bags of its "
                          "images' windows)")
    return {"bag": cfg.get("bag"), "task": cfg.get("task"), "_target_": target}


def refuse_patch_model_on_bags(cfg: DictConfig) -> None:
    if getattr(hydra.utils.get_class(cfg.data._target_), "samples_are_bags", False) and not is_bag_head(cfg.model):
        raise ConfigError(f"data={cfg.data.get('name')} gives bags (a label per slide or patient), not patches: "
                          "the model must be a head on bags. Fix: model=abmil (or mean_pool, max_pool)")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint on the held-out fold, and return the metrics (floats) and paths."""
    refuse_unknown_top_keys(cfg, "train")
    configure_wandb()
    localize_weights(cfg)  # weights files by absolute path: the checkpoint works from any folder
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    named = {name: hydra.utils.instantiate(c) for name, c in (cfg.get("callbacks") or {}).items()}
    named = without_unranked_best(named)  # monitor null: the last checkpoint is the one tested
    refuse_shared_state(named)  # before Lightning's error, which names no config key
    callbacks = [*named.values(), FlushLogs()]
    resume = resume_checkpoint(cfg, callbacks)  # before the data are prepared: a wrong ckpt_path fails at once
    ddp_children_rerun_this_job(resume)
    pl.seed_everything(cfg.seed, workers=True)

    # The data decides the net's head and input size, so it is prepared before the net is built; a pretrained
    # net (or the frozen encoder a head sits on, which the DataModule reads) decides the input's size and
    # normalisation.
    encoder = cfg.get("encoder")
    require_head(cfg.model, bool(encoder))
    refuse_patch_model_on_bags(cfg)
    bags = is_bag_head(cfg.model)  # a head on bags of tile embeddings (model=abmil|mean_pool|max_pool)
    task = task_of(cfg.get("task"))  # classification, or a survival | regression target (conf/task)
    if task.name != "classification" and not bags:
        raise ConfigError(f"task={task.name} trains heads on bags. Fix: model=abmil (or mean_pool, max_pool) with an "
                          "encoder, or task=classification")
    extra = bag_data(cfg) if bags else {}
    datamodule = hydra.utils.instantiate(cfg.data, fold=cfg.fold, _recursive_=False,
                                         preprocess=input_preprocess(cfg.model, encoder),
                                         embed=Embedder(encoder) if encoder else None, **extra)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # again: making the data draws random numbers (a frozen encoder's initial weights, before its file's are loaded),
    # finding them cached draws none; the net, its loaders and its training start from the seed either way
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    classify = task.name == "classification"
    net = build_net(cfg.model, datamodule.num_classes if classify else task.outputs, datamodule.input_size,
                    datamodule.feature_dim)
    settings = dict(
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.get("scheduler")),
        classes=list(datamodule.classes),
        input_size=datamodule.input_size,
        config=OmegaConf.to_container(cfg, resolve=True),  # in the checkpoint and, as hparams, in every logger
        feature_dim=datamodule.feature_dim,
    )
    module = ((BagClassifier if bags else PatchClassifier)(net, **settings) if classify
              else BagTargetModule.for_data(net, task, datamodule, **settings))
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        checkpoint = trainer.checkpoint_callback
        best_path = getattr(checkpoint, "best_model_path", "") or None
        best_score = getattr(checkpoint, "best_model_score", None)
        if cfg.monitor:  # monitor=null: no score to name (the last epoch is tested)
            metrics[f"{cfg.monitor}_best"] = float(best_score) if best_score is not None else metrics.get(cfg.monitor)
        if trainer.is_global_zero:
            _write_reports(trainer, output_dir)
        if cfg.get("test"):
            if best_path is None:
                log.warning("no best checkpoint (fast_dev_run or no checkpoint callback): testing the current weights")
            trainer.test(module, datamodule=datamodule, ckpt_path=best_path)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
            if bags and trainer.is_global_zero:  # one prediction per held-out bag: the rows of the k-fold report
                if classify:
                    write_bag_outputs(module.model, datamodule, output_dir, bag_settings(cfg))
                else:
                    write_target_outputs(module, datamodule, output_dir, bag_settings(cfg))
        metrics.update(fold=str(cfg.fold), best_checkpoint=best_path, output_dir=str(output_dir))
        if trainer.is_global_zero:
            (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        return metrics
    finally:
        finish_wandb()  # also on failure: a multirun's next job must not log into this job's run
