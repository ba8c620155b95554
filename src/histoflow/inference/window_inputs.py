"""Network inputs made on the model's device: loader workers ship a batch's grid windows as uint8, and here, where the
model runs, each distinct preprocessing turns them into every test-time view once for all the fold models that share
it (the folds of one run: the same crop, normalisation and resize; a mean image counts by its values).

A preprocessing is a stain step (image-level, applied in the workers before the windows are cut, as training's
prepare step applied it before the patches were cut) and an evaluation PatchTransform (crop, conversion to float,
normalisation, resize). Views are taken of the raw windows, before normalising, as training rotated raw patches
before the mean image was subtracted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from histoflow.data.transforms import PatchTransform

Stain = Callable[[np.ndarray], np.ndarray] | None


def stain_key(stain: Stain) -> object:
    """What decides a stain step's output: its fitted state where it has one (the folds of one run share it)."""
    return repr(stain.state()) if hasattr(stain, "state") else id(stain)


def view_windows(windows: torch.Tensor, views: Sequence[tuple[int, bool]]) -> torch.Tensor:
    """Every view (counter-clockwise quarter turns, mirrored first) of uint8 windows (B, s, s, 3): (B * V, s, s, 3),
    the views of a window consecutive; the windows as they are when the only view is the identity."""
    if list(views) == [(0, False)]:
        return windows
    viewed = [torch.rot90(windows.flip(2) if flip else windows, k, dims=(1, 2)) for k, flip in views]
    return torch.stack(viewed, dim=1).flatten(0, 1)


class SharedInputs:
    """The distinct preprocessings of some models' transforms, each run once per batch on the windows' device.

    `stains` are the distinct stain steps, in the order the loader workers cut windows for them; calling the object
    with those windows (stains, B, s, s, 3) gives each model its input (B * V, 3, c, c), one tensor shared by the
    models whose preprocessing is the same.
    """

    def __init__(self, transforms: Sequence[PatchTransform], views: Sequence[tuple[int, bool]] = ((0, False),)) -> None:
        self.views = list(views)
        stains: dict[object, int] = {}
        preps: dict[tuple, int] = {}
        self.stains: list[Stain] = []
        self.preparations: list[tuple[int, PatchTransform]] = []  # (stain index, transform) of each distinct one
        self.of_model: list[int] = []  # index into preparations of each model
        for t in transforms:
            s = stains.setdefault(stain_key(t.stain), len(stains))
            if s == len(self.stains):
                self.stains.append(t.stain)
            key = (s, t.key())
            if key not in preps:
                preps[key] = len(self.preparations)
                self.preparations.append((s, t))
            self.of_model.append(preps[key])

    def prepare(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """Each distinct preprocessing's input (B * V, 3, c, c) of windows (stains, B, s, s, 3) uint8, made where
        they are."""
        if windows.shape[0] != len(self.stains):
            raise ValueError(f"windows for {windows.shape[0]} stain step(s); these models have {len(self.stains)}")
        viewed: dict[int, torch.Tensor] = {}
        made = []
        for s, transform in self.preparations:
            if s not in viewed:
                viewed[s] = view_windows(windows[s], self.views)
            made.append(transform(viewed[s]))
        return made

    def per_model(self, made: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each model's input of the distinct inputs that prepare made."""
        return [made[i] for i in self.of_model]

    def __call__(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """Each model's input (B * V, 3, c, c) of windows (stains, B, s, s, 3) uint8, made where they are."""
        return self.per_model(self.prepare(windows))
