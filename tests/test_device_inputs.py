"""Whole-image prediction with the transform on the model's device: the loader workers cut uint8 windows, and each
distinct preprocessing (mean image or mean/std, crop, resize, test-time views) runs once per batch for all the fold
models that share it. The probabilities equal those of the transform run per model on the CPU, in the workers, as
predict did before (the reference below is that path, written out)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from histoflow.data.images import read_rgb
from histoflow.data.patches import extract_patches
from histoflow.data.transforms import PatchTransform
from histoflow.inference.voting import EncoderGroup, ImagePatches, grid_config, predict_images, tta_views
from histoflow.inference.window_inputs import SharedInputs
from histoflow.models import AlexNet32

GRID = grid_config(36, 32)
RTOL, ATOL = 1e-5, 1e-6  # float32 nets on batches of another make-up: the same numbers up to summation order


def mean_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(60, 200, (36, 36, 3))


def alexnet_transform(seed: int = 0) -> PatchTransform:
    """The 32-px recipe: centre 32-px crop of the 36-px window, minus the training mean image, / 255."""
    return PatchTransform(32, {"mean_image": mean_image(seed)}, normalize="image", train=False)


def encoder_transform() -> PatchTransform:
    """A torchvision encoder's: the crop in 0-1 units minus its mean, over its std, resized to 64 px."""
    return PatchTransform(32, {"mean_image": np.zeros((36, 36, 3))}, normalize="fixed", mean=(0.7, 0.5, 0.6),
                          std=(0.2, 0.25, 0.15), resize=64, interpolation="bilinear", train=False)


def fold_models() -> list[EncoderGroup | tuple[nn.Module, PatchTransform]]:
    """Three AlexNet32 fold models of one run (equal mean images, distinct transform objects), one of another run
    (its own mean image) and two heads on a frozen ResNet-18: three distinct preprocessings for six models."""
    torch.manual_seed(0)
    encoder = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    encoder.fc = nn.Identity()
    heads = [nn.Linear(512, 3) for _ in range(2)]
    with torch.no_grad():  # fresh Linear heads on fresh features give near-uniform probabilities: make them differ
        for head in heads:
            head.weight.mul_(40)
    return [*[(AlexNet32(3, input_size=32), alexnet_transform(0)) for _ in range(3)],
            (AlexNet32(3, input_size=32), alexnet_transform(1)),
            EncoderGroup(encoder.eval(), heads, encoder_transform())]


def write_images(folder: Path) -> list[Path]:
    """Two images of smooth colour with noise: 2 x 3 and 3 x 4 windows of 36 px every 32 px."""
    rng = np.random.default_rng(1)
    paths = []
    for k, (w, h) in enumerate([(100, 68), (132, 100)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([120 + 60 * np.sin(xx / 9 + k), 100 + 50 * np.cos(yy / 7), 150 + 40 * np.sin((xx + yy) / 11)],
                        axis=-1)
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"image{k}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def cpu_reference(paths: list[Path], models, views) -> tuple[np.ndarray, np.ndarray]:
    """Each image's mean probability and each model's, as predict computed them before: per image, the views of the
    raw windows (numpy), each model's transform on the CPU, the net per view, softmax averaged over views."""
    groups = [m if isinstance(m, EncoderGroup) else EncoderGroup(nn.Identity(), [m[0]], m[1]) for m in models]
    means, per_model = [], []
    with torch.inference_mode():
        for path in paths:
            windows = extract_patches(read_rgb(path)[0], GRID)[0]
            viewed = np.stack([np.rot90(windows[:, :, ::-1] if flip else windows, k, axes=(1, 2))
                               for k, flip in views], axis=1)
            n, v = viewed.shape[:2]
            probs = []
            for g in groups:
                features = g.encoder(g.transform(viewed.reshape(n * v, *viewed.shape[2:])))
                probs += [h(features).softmax(-1).view(n, v, -1).mean(1) for h in g.heads]
            probs = torch.stack(probs)  # (models, n, C)
            per_model.append(probs.mean(1).numpy())
            means.append(probs.mean(0).mean(0).numpy())
    return np.stack(means), np.stack(per_model)


@pytest.mark.parametrize("tta,workers", [(False, 0), (True, 0), (True, 1)])
def test_device_transform_gives_the_cpu_transforms_probabilities(tmp_path: Path, tta: bool, workers: int) -> None:
    """workers=0: the batch's inputs made where the net runs; 1: a net on the CPU has its loader worker make them."""
    paths = write_images(tmp_path)
    views = tta_views(tta)
    models = fold_models()
    expected, expected_per_model = cpu_reference(paths, models, views)
    votes = predict_images(paths, models, 3, GRID, views, batch_size=7 * len(views), num_workers=workers,
                           device="cpu", progress=False)
    assert votes.patches.tolist() == [6, 12]
    np.testing.assert_allclose(votes.mean_prob(), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(votes.model_prob_sum / votes.patches[:, None, None], expected_per_model,
                               rtol=RTOL, atol=ATOL)
    # the models do differ, so a model's input given to another would show
    spread = expected_per_model.max(1) - expected_per_model.min(1)
    assert spread.max() > 100 * ATOL


def test_no_transform_in_the_workers_and_one_per_distinct_preprocessing_per_batch(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    paths = write_images(tmp_path)
    calls: list[tuple[int, int, torch.dtype]] = []  # (transform id, inputs, input dtype)
    plain = PatchTransform.__call__

    def counted(self: PatchTransform, patches):
        calls.append((id(self), len(patches), torch.as_tensor(patches).dtype))
        return plain(self, patches)

    monkeypatch.setattr(PatchTransform, "__call__", counted)
    models = fold_models()
    inputs = SharedInputs([m.transform if isinstance(m, EncoderGroup) else m[1] for m in models])
    assert len(inputs.preparations) == 3 and inputs.of_model == [0, 0, 0, 1, 2]
    item = ImagePatches(paths, GRID, inputs.stains)[1]  # what a reader worker does for an image
    assert item.x.dtype == torch.uint8 and tuple(item.x.shape) == (1, 12, 36, 36, 3)
    assert calls == []  # no transform per image: the windows leave the workers as cut

    views = tta_views(True)
    per_batch = 5
    predict_images(paths, models, 3, GRID, views, batch_size=per_batch * len(views), num_workers=0, device="cpu",
                   progress=False)
    batches = math.ceil((6 + 12) / per_batch)
    shared = {id(t) for _, t in inputs.preparations}
    assert len(calls) == batches * 3  # once per batch for each of the three distinct preprocessings
    assert {c[0] for c in calls} == shared  # the fold models of one run share the first model's transform
    assert all(c[2] == torch.uint8 for c in calls)  # uint8 windows in, on the model's device
    for transform_id in shared:
        assert sum(n for t, n, _ in calls if t == transform_id) == (6 + 12) * len(views)  # every window, every view


def test_preprocessings_are_shared_by_value_and_kept_apart_where_they_differ() -> None:
    same = [alexnet_transform(0), alexnet_transform(0)]
    assert same[0].key() == same[1].key()
    assert alexnet_transform(0).key() != alexnet_transform(1).key()  # another mean image
    assert encoder_transform().key() != PatchTransform(32, {"mean_image": np.zeros((36, 36, 3))}, normalize="fixed",
                                                       mean=(0.7, 0.5, 0.6), std=(0.2, 0.25, 0.15), resize=96,
                                                       train=False).key()  # another resize
    training = PatchTransform(32, {"mean_image": mean_image(0)}, normalize="image", train=True)
    assert training.key() != PatchTransform(32, {"mean_image": mean_image(0)}, normalize="image", train=True).key()
