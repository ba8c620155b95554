"""Stain normalisation: reference to itself, others toward it, saved numbers, and prepare -> checkpoint -> predict."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from skimage.color import rgb2lab

from histoflow.data.datamodule import ShardDataModule
from histoflow.data.images import read_rgb
from histoflow.data.prepare import prepare_dataset
from histoflow.data.shards import decode_npy, tar_samples
from histoflow.data.stain import StainConfig, StainNormalizer


def he_image(seed: int, haematoxylin: float, eosin: float, side: int = 96) -> np.ndarray:
    """A synthetic H&E image: Beer-Lambert mix of H and E optical densities over a textured pattern."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    nuclei = (np.sin(xx / 5.0) * np.cos(yy / 7.0) > 0.3).astype(float) + rng.uniform(0, 0.2, (side, side))
    stroma = 1.0 - 0.5 * nuclei + rng.uniform(0, 0.2, (side, side))
    h_vec, e_vec = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
    od = haematoxylin * nuclei[..., None] * h_vec + eosin * stroma[..., None] * e_vec
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("method", "max_mean_error"), [("reinhard", 1.0), ("macenko", 12.0)])
def test_reference_maps_to_itself_and_others_move_toward_it(method: str, max_mean_error: float) -> None:
    reference, other = he_image(0, 1.0, 0.6), he_image(1, 0.45, 1.1)
    normalise = StainNormalizer.fit(method, reference)
    same = normalise(reference)
    assert same.dtype == np.uint8 and same.shape == reference.shape
    assert np.abs(same.astype(int) - reference).mean() <= max_mean_error
    lab_mean = lambda im: rgb2lab(im).reshape(-1, 3).mean(0)  # noqa: E731
    before = np.linalg.norm(lab_mean(other) - lab_mean(reference))
    after = np.linalg.norm(lab_mean(normalise(other)) - lab_mean(reference))
    assert after < 0.5 * before, (before, after)
    # structure kept: the normalised image is still the same picture (strongly correlated in lightness)
    corr = np.corrcoef(rgb2lab(other)[..., 0].ravel(), rgb2lab(normalise(other))[..., 0].ravel())[0, 1]
    assert corr > 0.9


def test_saved_numbers_rebuild_the_same_normaliser() -> None:
    reference, other = he_image(0, 1.0, 0.6), he_image(1, 0.45, 1.1)
    for method in ("reinhard", "macenko"):
        fitted = StainNormalizer.fit(method, reference)
        state = json.loads(json.dumps(fitted.state()))  # plain numbers
        np.testing.assert_array_equal(StainNormalizer.from_state(state)(other), fitted(other))
    assert StainNormalizer.from_state(None) is None


def test_an_image_without_stain_is_left_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    normalise = StainNormalizer.fit("macenko", he_image(0, 1.0, 0.6))
    blank = np.full((32, 32, 3), 250, np.uint8)
    with caplog.at_level(logging.WARNING, logger="histoflow.data.stain"):
        np.testing.assert_array_equal(normalise(blank), blank)
    assert normalise.failed == 1
    assert "macenko stain normalisation left an image unchanged: too little stain" in caplog.text


def test_a_bug_in_normalising_raises_instead_of_leaving_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only Macenko's too-little-stain failure leaves an image as it was; any other error is not hidden."""
    normalise = StainNormalizer.fit("reinhard", he_image(0, 1.0, 0.6))
    monkeypatch.setattr(normalise._normalizer, "normalize", lambda image: image[..., 5])
    with pytest.raises(IndexError):
        normalise(he_image(1, 0.45, 1.1))
    assert normalise.failed == 0


def test_config_errors_say_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs data.stain.reference"):
        StainConfig.from_config({"method": "macenko"})
    with pytest.raises(ValueError, match="expected null"):
        StainConfig.from_config({"method": "vahadane", "reference": "x.png"})
    with pytest.raises(FileNotFoundError, match="no such image"):
        StainNormalizer.from_config(StainConfig("reinhard", str(tmp_path / "missing.png")))
    assert StainNormalizer.from_config(StainConfig()) is None


def test_prepare_cuts_patches_from_the_normalised_image(tmp_path: Path) -> None:
    from PIL import Image

    for name, (h, e) in {"A": (1.0, 0.6), "B": (0.5, 1.0)}.items():
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(5):
            path = tmp_path / "images" / name / f"{name}-{i}.png"
            Image.fromarray(he_image(10 * i + len(name), h, e, side=72)).save(path)
    reference = tmp_path / "images" / "A" / "A-0.png"
    data = {"name": "he", "root": str(tmp_path / "images"), "shards": {"dir": str(tmp_path / "prepared"), "workers": 1},
            "split": {"k": 5, "val_fraction": 0.0}, "patches": {"size": 36, "stride": 36, "rotations": [0]}}
    plain = prepare_dataset(data, quiet=True)
    stained = prepare_dataset({**data, "stain": {"method": "reinhard", "reference": str(reference)}}, quiet=True)
    assert plain.path != stained.path and plain.stain is None
    normalise = StainNormalizer.from_state(stained.stain)
    assert normalise is not None and normalise.method == "reinhard"
    rows = {i: r for i, r in enumerate(stained.manifest())}
    checked = 0
    for shard in sorted((stained.path / "shards").glob("*.tar")):
        for sample in tar_samples([{"url": str(shard)}]):
            image_index, x, y, _ = (int(v) for v in sample["__key__"].split("-"))
            image = normalise(read_rgb(stained.root / rows[image_index]["image"])[0])
            np.testing.assert_array_equal(decode_npy(sample["npy"]), image[y:y + 36, x:x + 36])
            checked += 1
    assert checked == 10 * 4
    # what every checkpoint saves of the data module: the fitted numbers, for prediction to apply
    module = ShardDataModule(fold=1, **{**data, "stain": {"method": "reinhard", "reference": str(reference)}})
    module.setup("fit")
    assert module.state_dict()["stain"] == stained.stain


def test_prediction_cuts_windows_from_the_normalised_image(tmp_path: Path) -> None:
    """A model trained on stain-normalised patches gets windows of the normalised image at prediction."""
    from PIL import Image

    from histoflow.data.transforms import PatchTransform
    from histoflow.inference.voting import ImagePatches, grid_config
    from histoflow.inference.window_inputs import SharedInputs

    image = he_image(3, 0.5, 1.0, side=100)
    Image.fromarray(image).save(tmp_path / "x.png")
    normalise = StainNormalizer.fit("reinhard", he_image(0, 1.0, 0.6))
    as_is = PatchTransform(None, {"mean_image": np.zeros((36, 36, 3))}, "none")
    stained = PatchTransform(None, {"mean_image": np.zeros((36, 36, 3))}, "none", stain=normalise)
    inputs = SharedInputs([as_is, stained, stained])
    assert inputs.stains == [None, normalise] and inputs.of_model == [0, 1, 1]  # one set of windows a stain step
    item = ImagePatches([tmp_path / "x.png"], grid_config(36, 32), inputs.stains)[0]
    x = item.x.numpy()  # (stain steps, N, 36, 36, 3) uint8
    expected = normalise(image)
    for k, (ox, oy) in enumerate(item.origins.tolist()):
        np.testing.assert_array_equal(x[0, k], image[oy:oy + 36, ox:ox + 36])
        np.testing.assert_array_equal(x[1, k], expected[oy:oy + 36, ox:ox + 36])
