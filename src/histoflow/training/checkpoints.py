"""Reading a histoflow checkpoint safely: torch.load(weights_only=True), so it cannot run pickled code, and the
net rebuilt from the config stored in it only when every `_target_` there is on a trusted list. Each checkpoint
is read once: resume checks it, prediction builds its classifier, both from the same read."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from histoflow.common.errors import HistoflowError
from histoflow.data.targets import TaskConfig
from histoflow.models import build_encoder, clean_state_dict, encoder_with_head
from histoflow.models.build import build_net
from histoflow.training.module import PatchClassifier


class CheckpointError(HistoflowError, ValueError):
    """A checkpoint that cannot be used for this prediction; the message names the file and the fix."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A histoflow checkpoint's contents, read without running any pickled code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message: boilerplate around one line that names the opcode or class it would not load
        detail = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(
            ("Weights only load failed", "Check the documentation", "Please file"))]
        reason = detail[-1] if detail else str(e)
        if "GLOBAL" not in reason:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from e
        raise CheckpointError(f"{path}: refused, it holds pickled objects beyond weights and plain values, which "
                              f"could run code when loaded ({reason}). Fix: use a checkpoint of train.py") from e
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... for files that are no checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    missing = [k for k in ("classes", "input_size", "config") if k not in (hparams or {})]
    if missing:
        raise CheckpointError(f"{path}: not a histoflow training checkpoint (hyper_parameters lack {missing}). "
                              "Fix: use a checkpoint written by train.py")
    return checkpoint


TRUSTED_TARGETS = ("histoflow.models.", "torchvision.models.", "torch.optim.")


class UntrustedCheckpoint(CheckpointError):
    """A checkpoint whose stored config would build objects outside the trusted prefixes."""


def untrusted_targets(config: Any, trusted: Iterable[str]) -> list[str]:
    """Every `_target_` in a (nested) config that does not start with a trusted prefix."""
    if isinstance(config, Mapping):
        own = [str(config["_target_"])] if "_target_" in config else []
        bad = [t for t in own if not t.startswith(tuple(trusted))]
        return bad + [t for v in config.values() for t in untrusted_targets(v, trusted)]
    if isinstance(config, (list, tuple)):
        return [t for v in config for t in untrusted_targets(v, trusted)]
    return []


def checkpoint_task(hparams: Mapping[str, Any]) -> TaskConfig:
    """The task a checkpoint's head learned: its training config's task section (classification where none)."""
    return TaskConfig.from_config((hparams.get("config") or {}).get("task"))


def head_outputs(hparams: Mapping[str, Any]) -> int:
    """The net's outputs: a class each, or the task's (one risk or value; a hazard logit per time bin)."""
    task = checkpoint_task(hparams)
    return len(hparams["classes"]) if task.name == "classification" else task.outputs


def load_classifier(checkpoint_path: str | Path, trusted: Iterable[str] = TRUSTED_TARGETS,
                    checkpoint: Mapping[str, Any] | None = None, encoder_weights: str | None = None,
                    with_encoder: bool = True) -> PatchClassifier:
    """A trained PatchClassifier from a histoflow checkpoint, its net rebuilt from the config stored in it.

    The file is read once, with weights_only=True (read_checkpoint: no pickled code runs), unless its contents are
    given already read (`checkpoint`), and the stored model config is instantiated only when its `_target_`s start
    with a trusted prefix. A head's encoder is rebuilt with `encoder_weights` where given, else the weights file it
    was trained on. with_encoder=False: a head alone, whatever its encoder (a head on slide or patient bags reads
    the features the cohort's embedding made).
    """
    if checkpoint is None:
        checkpoint = read_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    config, classes = hparams["config"], hparams["classes"]
    bad = untrusted_targets([config.get("model"), config.get("encoder")], trusted)
    if bad:
        raise UntrustedCheckpoint(f"{checkpoint_path}: its config would instantiate {bad}, which are not trusted. "
                                  f"Fix: if you trust this checkpoint, add the prefixes to trusted_targets "
                                  f"(now {list(trusted)})")
    model_cfg = dict(config["model"])
    if "weights" in model_cfg:
        model_cfg["weights"] = None  # the checkpoint holds every weight: no pretrained download needed
    net = build_net(model_cfg, head_outputs(hparams), hparams["input_size"], hparams.get("feature_dim"))
    net.load_state_dict(clean_state_dict(checkpoint))
    # a head on frozen features: predicts patches through its encoder, rebuilt as trained
    if with_encoder and config.get("encoder"):
        encoder = {**config["encoder"], **({"weights": encoder_weights} if encoder_weights else {})}
        net = encoder_with_head(build_encoder(encoder, hparams["input_size"])[0], net)
    # no optimizer: a loaded classifier predicts; training resumes through Trainer.fit(ckpt_path=...)
    return PatchClassifier(net, optimizer=None, classes=classes, input_size=hparams["input_size"], config=config,
                           feature_dim=hparams.get("feature_dim"))
