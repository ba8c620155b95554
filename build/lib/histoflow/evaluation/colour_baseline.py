"""How much colour alone explains: per-image RGB statistics and a classifier, on the same folds as the net.

Scanners, stains and slides differ in colour, and a net can learn the colour of a slide rather than the
disease. These baselines see nothing but the mean and standard deviation of R, G and B of each image;
for fold k each is fit on the images of the other folds and predicts fold k's, exactly as the fold
models do. Two classifiers, because a linear one understates colour: on the lymphoma images under
grouped folds a logistic regression on the six numbers is near chance (0.44) while a random forest on
the same six numbers reaches 0.71, above every net trained there. Where a baseline comes close to the
net, the net's accuracy says little about morphology.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histoflow.common.errors import ConfigError
from histoflow.data.images import read_rgb

# name -> a seeded, unfitted classifier; the report runs each on the same folds
CLASSIFIERS: dict[str, Callable[[int], ClassifierMixin]] = {
    "logistic": lambda seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
    "forest": lambda seed: RandomForestClassifier(n_estimators=500, random_state=seed, n_jobs=1),
}
NAMES = {"logistic": "logistic regression", "forest": "random forest (500 trees)"}


def colour_features(paths: Sequence[str | Path]) -> np.ndarray:
    """(N, 6): mean and standard deviation of R, G, B of each image, on the 0..255 scale."""
    features = []
    for path in paths:
        pixels = read_rgb(path)[0].reshape(-1, 3).astype(np.float64)
        features.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
    return np.array(features).reshape(-1, 6)


def cross_validated_predictions(features: np.ndarray, labels: Sequence[str], folds: Sequence[str],
                                seed: int = 0, classifier: str = "logistic") -> list[str]:
    """Each image's class from a `classifier` (a key of CLASSIFIERS) fit on the images of the other folds."""
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"colour baseline {classifier!r}: expected one of {', '.join(CLASSIFIERS)}")
    labels, folds = np.asarray(labels), np.asarray(folds)
    predicted = np.empty(len(labels), dtype=object)
    for fold in dict.fromkeys(folds.tolist()):
        held_out = folds == fold
        train = ~held_out
        if len(set(labels[train])) < 2:  # one fold alone, or one class: nothing to fit; predict the majority
            values, counts = np.unique(labels[train] if train.any() else labels, return_counts=True)
            predicted[held_out] = values[counts.argmax()]
            continue
        model = CLASSIFIERS[classifier](seed)
        model.fit(features[train], labels[train])
        predicted[held_out] = model.predict(features[held_out])
    return predicted.tolist()
