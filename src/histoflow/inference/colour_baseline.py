"""How much colour alone explains: per-image RGB statistics + logistic regression, on the same folds as the net.

Scanners, stains and slides differ in colour, and a net can learn the colour of a slide rather than the
disease. This baseline sees nothing but the mean and standard deviation of R, G and B of each image;
for fold k it is fit on the images of the other folds and predicts fold k's, exactly as the fold
models do. Where it comes close to the net, the net's accuracy says little about morphology.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histoflow.data.images import read_rgb


def colour_features(paths: Sequence[str | Path]) -> np.ndarray:
    """(N, 6): mean and standard deviation of R, G, B of each image, on the 0..255 scale."""
    features = []
    for path in paths:
        pixels = read_rgb(path)[0].reshape(-1, 3).astype(np.float64)
        features.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
    return np.array(features).reshape(-1, 6)


def cross_validated_predictions(features: np.ndarray, labels: Sequence[str], folds: Sequence[str],
                                seed: int = 0) -> list[str]:
    """Each image's class from a logistic regression fit on the images of the other folds."""
    labels, folds = np.asarray(labels), np.asarray(folds)
    predicted = np.empty(len(labels), dtype=object)
    for fold in dict.fromkeys(folds.tolist()):
        held_out = folds == fold
        train = ~held_out
        if len(set(labels[train])) < 2:  # one fold alone, or one class: nothing to fit; predict the majority
            values, counts = np.unique(labels[train] if train.any() else labels, return_counts=True)
            predicted[held_out] = values[counts.argmax()]
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
        model.fit(features[train], labels[train])
        predicted[held_out] = model.predict(features[held_out])
    return predicted.tolist()
