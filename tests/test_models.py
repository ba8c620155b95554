"""Tests for histoflow.models: AlexNet32 and torchvision models with resized heads and loaded weights."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import LocalServer
from torch import nn

from histoflow.models import (
    AlexNet32,
    classifier_head,
    clean_state_dict,
    torchvision_model,
)

REPO = Path(__file__).resolve().parents[1]


def n_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- AlexNet32 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 96])
@pytest.mark.parametrize("classes", [3, 9])
def test_alexnet32_output_shape(size: int, classes: int) -> None:
    model = AlexNet32(num_classes=classes, input_size=size)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes)


def test_alexnet32_parameter_count() -> None:
    # conv weights k*k*in*out + out biases; ceil-mode pooling gives 32 -> 16 -> 8 -> 4, so fc1 sees 64*4*4.
    conv1 = 5 * 5 * 3 * 32 + 32
    conv2 = 5 * 5 * 32 * 32 + 32
    conv3 = 5 * 5 * 32 * 64 + 64
    fc1 = 64 * 4 * 4 * 64 + 64
    fc2 = 64 * 3 + 3
    assert n_params(AlexNet32(num_classes=3)) == conv1 + conv2 + conv3 + fc1 + fc2 == 145_123
    # A 64 px input ends at 8x8 feature maps: only fc1 grows.
    fc1_64 = 64 * 8 * 8 * 64 + 64
    assert n_params(AlexNet32(num_classes=3, input_size=64)) == conv1 + conv2 + conv3 + fc1_64 + fc2


def test_alexnet32_grey_input() -> None:
    model = AlexNet32(num_classes=2, in_channels=1)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 2)


# --- torchvision_model -----------------------------------------------------------------------------


def test_resnet18_output_shape() -> None:
    model = torchvision_model("resnet18", 3)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_alexnet_head_replaced() -> None:
    model = torchvision_model("alexnet", 5)
    name, head = classifier_head(model)
    assert name == "classifier.6"
    assert model.classifier[6] is head and head.out_features == 5 and head.in_features == 4096


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121"])
def test_other_families_head_replaced(name: str) -> None:
    _, head = classifier_head(torchvision_model(name, 4))
    assert head.out_features == 4


def test_local_state_dict_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    model = torchvision_model("resnet18", 3, weights=str(path))
    assert model.fc.out_features == 3
    saved = imagenet.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, saved[key]), key


def test_lightning_compiled_checkpoint_loads(tmp_path: Path) -> None:
    trained = torchvision_model("resnet18", 3)
    # A LightningModule holding a compiled model, plus a loss buffer that is not part of the model.
    state_dict = {f"model._orig_mod.{k}": v for k, v in trained.state_dict().items()}
    state_dict["criterion.weight"] = torch.ones(3)
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 3}, path)
    model = torchvision_model("resnet18", 3, weights=str(path))
    # The head matches num_classes, so the trained head is kept too.
    assert torch.equal(model.fc.weight, trained.fc.weight)
    assert torch.equal(model.conv1.weight, trained.conv1.weight)


def test_clean_state_dict_prefixes() -> None:
    t = torch.zeros(1)
    assert clean_state_dict({"_orig_mod.model.fc.weight": t, "loss.weight": t}) == {"fc.weight": t}
    assert clean_state_dict({"fc.weight": t}) == {"fc.weight": t}


def test_missing_file_and_bad_name() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        torchvision_model("resnet18", 3, weights="nowhere/resnet18.pth")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        torchvision_model("resnet18", 3, weights="NOT_A_WEIGHTS_NAME")


def test_url_weights_load(http_server: LocalServer, tmp_path: Path) -> None:
    base, served = http_server.url, http_server.root
    torch.manual_seed(1)
    imagenet = torchvision.models.shufflenet_v2_x0_5(num_classes=1000)
    torch.save(imagenet.state_dict(), served / "shufflenet.pth")
    cache = tmp_path / "cache"
    model = torchvision_model("shufflenet_v2_x0_5", 2, weights=f"{base}/shufflenet.pth", cache_dir=str(cache))
    assert model.fc.out_features == 2
    assert torch.equal(model.conv1[0].weight, imagenet.conv1[0].weight)
    assert (cache / "shufflenet.pth").is_file()
    # Second call reads the cache: it works even once the file is gone from the server.
    (served / "shufflenet.pth").unlink()
    again = torchvision_model("shufflenet_v2_x0_5", 2, weights=f"{base}/shufflenet.pth", cache_dir=str(cache))
    assert torch.equal(again.conv1[0].weight, imagenet.conv1[0].weight)


def test_freeze_backbone() -> None:
    model = torchvision_model("resnet18", 3, freeze_backbone=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert n_params(model, trainable_only=True) == 512 * 3 + 3


def test_offline_torchvision_weights_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached there

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    # Fail at once instead of waiting on a network that may hang rather than refuse.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="IMAGENET1K_V1") as info:
        torchvision_model("resnet18", 3, weights="IMAGENET1K_V1")
    assert "model.weights=null" in str(info.value) and "local path" in str(info.value)
    with pytest.raises(RuntimeError, match="model.weights=null"):
        torchvision_model("resnet18", 3, weights="DEFAULT")


def _squeezenet_weights() -> Path:
    path = REPO.parent / "shared" / "weights" / "squeezenet1_1-imagenet-features.pth"
    if not path.is_file():
        pytest.skip(f"real pretrained weights {path} are absent (see ../shared/weights/README.md)")
    return path


def test_features_only_state_dict_loads_with_a_new_head() -> None:
    """ImageNet SqueezeNet 1.1 features (no classifier in the file): every feature tensor loads, the 1x1-conv head
    is new with the data's classes."""
    path = _squeezenet_weights()
    features = torch.load(path, map_location="cpu", weights_only=True)
    model = torchvision_model("squeezenet1_1", 3, weights=str(path))
    name, head = classifier_head(model)
    assert name == "classifier.1" and isinstance(head, torch.nn.Conv2d) and head.out_channels == 3
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in features.items())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 96, 96)).shape == (2, 3)


def test_a_file_missing_more_than_the_head_is_refused(tmp_path: Path) -> None:
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    del sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="missing keys.*layer1.0.conv1.weight"):
        torchvision_model("resnet18", 3, weights=str(tmp_path / "partial.pth"))
