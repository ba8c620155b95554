"""What `predict` (and `embed`) refuse in one line: a prediction grid below one pixel, inputs named by their key
(images=, slides=, tta=), a missing ckpt_path, an absent CUDA device, a read-only prepared folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import config, make_images

from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.data.prepare import prepare_dataset


@pytest.mark.parametrize("key, value", [("stride", -5), ("stride", 0), ("size", 0)])
def test_a_prediction_grid_below_one_pixel_is_refused(key: str, value: int) -> None:
    """Issue 29.6: grid.stride=-5 ran (4,312 patches an image) and grid.stride=0 silently became 32."""
    from types import SimpleNamespace

    from histoflow.inference.held_out import prediction_grid

    model = SimpleNamespace(config={"data": {"patches": {"size": 36, "stride": 32}}})
    with pytest.raises(ConfigError, match=f"grid.{key}={value}: must be at least 1"):
        prediction_grid({key: value}, model)
    assert prediction_grid({"stride": 16}, model).stride == 16 and prediction_grid({}, model).stride == 32



def test_prediction_inputs_are_named_right(tmp_path: Path) -> None:
    """Issue 29: `tta=maybe` became the views m, a, y, b, e; a missing folder was 'no image files found there';
    `slides=/missing` spoke of images=; slides and images together left the images out in silence."""
    from conftest import compose_config

    from histoflow.deployment.deploy import predict_models
    from histoflow.deployment.predict import files_matching
    from histoflow.inference.voting import tta_views

    with pytest.raises(ConfigError, match="tta='maybe': expected true, false or a list"):
        tta_views("maybe")
    with pytest.raises(MissingInputError, match="images=/nonexistent/x: no such file or folder"):
        files_matching("/nonexistent/x")
    with pytest.raises(MissingInputError, match=r"slides=/missing: no such file or folder"):
        files_matching("/missing", (".svs",), key="slides")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match=r"slides=.*empty: no slide files \(.svs\) found there.*'dir/\*.svs'"):
        files_matching(str(tmp_path / "empty"), (".svs",), key="slides")
    cfg = compose_config("predict", ["ckpt_path=x", "slides=a.svs", "images=b"])
    with pytest.raises(ConfigError, match="one run predicts slides or images"):
        predict_models(cfg)


@pytest.mark.parametrize("given", [["images=b"], ["slides=a.svs"]])
def test_the_kfold_reports_run_refuses_new_images_or_slides(given: list[str]) -> None:
    """inference.held_out.predict (a multirun's end writes its report with it) predicts each fold's held-out images
    only: new images or slides given to it are deployment's, refused by name before any checkpoint is read (ckpt_path=x
    is not there)."""
    from conftest import compose_config

    from histoflow.inference.held_out import predict

    with pytest.raises(ConfigError, match=f"{given[0]}.*held-out images, no others.*histoflow predict"):
        predict(compose_config("predict", ["ckpt_path=x", *given]))


def test_user_errors_of_predict_and_embed_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29: predict without ckpt_path, device=cuda without CUDA, embedding into a read-only prepared folder:
    each a traceback once."""
    from conftest import compose_config

    from histoflow.common.errors import NotWritableError
    from histoflow.common.machine import resolve_device
    from histoflow.deployment.deploy import predict
    from histoflow.features.embeddings import embed_dataset

    with pytest.raises(ConfigError, match="ckpt_path is needed"):
        predict(compose_config("predict", ["images=somewhere"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda: no such CUDA device here"):
            predict(compose_config("predict", ["ckpt_path=x", "device=cuda"]))
    with pytest.raises(ConfigError, match="slide.device=cuda:7: no such CUDA device"):
        resolve_device("cuda:7", "slide.device")
    root = make_images(tmp_path / "images", per_class=4)
    prepared = prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)

    def refused(self: Path, *args, **kwargs) -> None:  # a read-only folder (chmod does not stop root, who runs CI)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "touch", refused)
    with pytest.raises(NotWritableError, match="cannot write the embeddings here \\(Permission denied\\)"):
        embed_dataset(prepared, {"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1",
                                 "weights": None}, {"crop": 32, "normalize": "imagenet"}, progress=False)
