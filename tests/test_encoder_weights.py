"""A damaged encoder weights file (issue 37, item 8): truncated, a text page saved in its place, or a whole pickled
model rather than its state dict is refused naming the file, what it is and the fix, and the embedding leaves no
empty `<encoder>-<key>/` folder behind; the hub's errors for an encoder name encoder.name (item 17)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import config, make_images

from histoflow.common.errors import HistoflowError
from histoflow.data.prepare import prepare_dataset
from histoflow.features.embeddings import embed_dataset
from histoflow.models import build_encoder
from histoflow.models.preprocess import model_preprocess

ENCODER = {"_target_": "histoflow.models.torchvision_model", "name": "squeezenet1_1"}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    good = folder / "good.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), good)
    files = {"truncated": folder / "truncated.pth", "text": folder / "text.pth", "whole": folder / "whole.pth"}
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["text"].write_text("<!DOCTYPE html>\n<html><body>Sign in to download</body></html>\n")
    torch.save(torchvision.models.squeezenet1_1(), files["whole"])  # the model, not its state dict
    return files


@pytest.mark.parametrize("kind, said", [("truncated", "truncated"), ("text", "a text file (it begins '<!DOCTYPE"),
                                        ("whole", "holds pickled objects beyond tensors (a whole pickled model?)")])
def test_a_damaged_weights_file_is_named_with_the_fix(damaged: dict[str, Path], kind: str, said: str) -> None:
    path = damaged[kind]
    with pytest.raises(HistoflowError) as caught:
        build_encoder({**ENCODER, "weights": str(path)}, 64)
    assert str(caught.value).startswith(f"encoder.weights={path}: {said}")
    assert "Fix: copy or download the weights file again" in str(caught.value)


def test_a_failed_embedding_leaves_no_empty_folder(damaged: dict[str, Path], tmp_path: Path) -> None:
    prepared = prepare_dataset(config(make_images(tmp_path / "images", per_class=4), tmp_path / "prepared"),
                               quiet=True)
    for run in range(2):
        with pytest.raises(HistoflowError, match=rf"encoder.weights={damaged['truncated']}: truncated"):
            embed_dataset(prepared, {**ENCODER, "weights": str(damaged["truncated"])},
                          {"crop": 32, "normalize": "imagenet"}, progress=False)
    assert [p.name for p in (prepared.path / "embeddings").iterdir() if p.is_dir()] == []


def test_an_encoders_hub_error_names_encoder_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub cannot be reached
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = {"_target_": "histoflow.models.timm_model", "name": "hf-hub:org/net", "preprocess": {"input_size": "auto"}}
    with pytest.raises(HistoflowError, match=r"^encoder.name=hf-hub:org/net: its pretrained weights come from"):
        model_preprocess(cfg, "encoder")
