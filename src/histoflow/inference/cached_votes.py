"""The k-fold report of heads on a frozen encoder from the embeddings training cached: each held-out image's window
features are read from <prepared>/embeddings/<encoder>-<key>/ (features/embeddings.py; the folder the checkpoint
names, so the same key: encoder config, weights sha256, input preprocessing) instead of cutting the image and
running the encoder again.

Read only where the cache holds exactly the windows the report's grid cuts: the training windows' side, stride and
resize, no tissue filter, the unrotated windows (rotation 0 of the cached ones), no test-time views, the same
prepared data; otherwise the report embeds as before. The votes are those of predict_images on the same windows
(the encoder's output up to float rounding of another batch composition).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from histoflow.data.dataset import PreparedDataset
from histoflow.data.patches import PatchConfig
from histoflow.data.problems import Problem
from histoflow.data.shards import stack_npy
from histoflow.features.bags import read_tiles
from histoflow.features.embeddings import RECORD, EmbeddedDataset
from histoflow.inference.fold_models import FoldModel, encoder_groups
from histoflow.inference.voting import Votes

log = logging.getLogger(__name__)


def cached_features(models: Sequence[FoldModel], prepared: PreparedDataset, grid: PatchConfig,
                    views: Sequence[tuple[int, bool]]) -> EmbeddedDataset | None:
    """The embeddings the models' heads were trained on, where they hold the report's windows; else None."""
    keys = {m.encoder_key for m in models}
    if len(keys) != 1 or None in keys or list(views) != [(0, False)]:
        return None
    trained = PatchConfig.from_config(models[0].config["data"].get("patches"))
    if (trained.size, trained.stride, trained.resize) != (grid.size, grid.stride, grid.resize) \
            or trained.min_tissue > 0 or 0 not in trained.rotations:
        return None
    path = Path(str(next(iter(keys))))
    if not (path / RECORD).is_file():
        return None
    features = EmbeddedDataset(path, prepared)
    if Path(features.record.get("prepared", "")) != prepared.path:
        return None
    return features


@torch.inference_mode()
def cached_votes(features: EmbeddedDataset, fold: str, held_out: Sequence[Mapping[str, Any]], root: Path,
                 models: Sequence[FoldModel], num_classes: int) -> Votes:
    """Votes of the held-out images of `fold` (manifest rows) by the models' heads on the cached features of their
    unrotated windows: the form predict_images gives."""
    t0 = time.perf_counter()
    tiles = read_tiles(features.split(fold).test)
    heads = [head.eval() for g in encoder_groups(models) for head in g.heads]
    n = len(held_out)
    votes = np.zeros((n, num_classes), dtype=np.int64)
    prob_sum = np.zeros((n, num_classes))
    model_prob_sum = np.zeros((n, len(heads), num_classes))
    patches = np.zeros(n, dtype=np.int64)
    problems: dict[int, Problem] = {}
    for i, row in enumerate(held_out):
        vectors, coords, _ = tiles.get(int(row["index"]), ([], [], 0))
        unrotated = [v for v, c in zip(vectors, coords) if c[3] == 0]
        if not unrotated:
            problems[i] = Problem(str(root / row["image"]), "too-small", f"{root / row['image']}: no window of it in "
                                  f"the cached embeddings {features.path}")
            continue
        x = torch.from_numpy(stack_npy(unrotated)).float()
        per_model = torch.stack([head(x).float().softmax(-1) for head in heads]).double()  # (models, windows, C)
        probs = per_model.mean(0)
        votes[i] = np.bincount(probs.argmax(1).numpy(), minlength=num_classes)
        prob_sum[i] = probs.sum(0).numpy()
        model_prob_sum[i] = per_model.sum(1).numpy()
        patches[i] = len(unrotated)
    return Votes([str(root / r["image"]) for r in held_out], votes, prob_sum, patches, problems,
                 time.perf_counter() - t0, model_prob_sum)
