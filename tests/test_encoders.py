"""Encoders by name: timm models with num_classes, local weights files, the offline hub failing at once with the
fix, and the input preprocessing taken from the weights' own config; errors that name the encoder's keys."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import timm
import torch
from conftest import compose_train, make_images

from histoflow.common.errors import ConfigError, MissingInputError
from histoflow.models import (
    build_encoder,
    model_preprocess,
    timm_model,
    torchvision_model,
)
from histoflow.models.build import build_net
from histoflow.models.timm_models import check_hub
from histoflow.models.torchvision_models import WeightsError
from histoflow.training.run import train

AUTO = {"input_size": "auto", "interpolation": "auto", "mean": "auto", "std": "auto"}
pytestmark = pytest.mark.usefixtures("leave_no_trace")


@pytest.fixture()
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """HF_ENDPOINT at a port of this machine where nothing listens: the hub cannot be reached, at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: connections are refused
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return endpoint


@pytest.mark.parametrize("name", ["resnet18", "vit_small_patch16_224"])
def test_timm_model_by_name_with_num_classes(name: str) -> None:
    model = timm_model(name, num_classes=3, kwargs={"img_size": 32} if name.startswith("vit") else None)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    encoder = timm_model(name, num_classes=0, kwargs={"img_size": 32} if name.startswith("vit") else None)
    assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, encoder.num_features)


def test_unknown_timm_name_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="timm.list_models"):
        timm_model("no_such_net_42", num_classes=3)


def test_local_weights_file_loads_with_a_new_head(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", num_classes=1000)  # an ImageNet-shaped file: 1000-class head
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = timm_model("resnet18", num_classes=3, weights=str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 3
    # features only (no head in the file), as an encoder
    features = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save(features, path)
    encoder = timm_model("resnet18", num_classes=0, weights=str(path))
    x = torch.rand(2, 3, 64, 64)
    source.eval(), encoder.eval()
    torch.testing.assert_close(encoder(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_safetensors_file_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=0)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    model = timm_model("resnet18", num_classes=2, weights=str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_a_weights_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(WeightsError, match="unexpected keys"):
        timm_model("resnet18", num_classes=3, weights=str(tmp_path / "resnet34.pth"))
    with pytest.raises(MissingInputError, match="does not exist"):
        timm_model("resnet18", num_classes=3, weights=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("name", ["hf-hub:MahmoodLab/UNI", "resnet18"])
def test_offline_hub_fails_at_once_with_the_fix(name: str, offline_hub: str) -> None:
    with pytest.raises(WeightsError) as err:
        timm_model(name, num_classes=3, pretrained=True)
    message = str(err.value)
    assert offline_hub in message and "model.weights=<file>" in message
    if name.startswith("hf-hub:"):
        assert "architecture" in message  # offline, a hub name needs the architecture's own timm name
    with pytest.raises(WeightsError):  # the hub's config too, when the preprocessing asks for it
        model_preprocess({"_target_": "histoflow.models.timm_model", "name": "hf-hub:org/x", "preprocess": AUTO})


def test_hub_check_is_skipped_when_huggingface_hub_is_told_to_stay_offline(offline_hub: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE, huggingface_hub reads its local cache only: the check tries no connection (the hub of
    offline_hub refuses one) and passes."""
    connections: list[tuple] = []

    def connect(address: tuple, timeout: float) -> socket.socket:
        connections.append(address)
        return socket.socket()

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub("resnet18")
    assert connections == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    check_hub("resnet18")  # without it the check connects (here to the stub, which lets it)
    assert connections == [("127.0.0.1", int(offline_hub.rsplit(":", 1)[1]))]


def test_preprocessing_from_the_pretrained_config() -> None:
    vit = {"_target_": "histoflow.models.timm_model", "name": "vit_small_patch16_224", "preprocess": AUTO}
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg("vit_small_patch16_224").to_dict())
    prep = model_preprocess(vit)
    assert prep.input_size == cfg["input_size"][-1] and prep.mean == cfg["mean"] and prep.std == cfg["std"]
    assert prep.interpolation == cfg["interpolation"]
    assert prep.loader()["normalize"] == "fixed"
    given = model_preprocess({**vit, "preprocess": {**AUTO, "input_size": None, "mean": [0.1] * 3, "std": [0.2] * 3}})
    assert given.input_size is None and given.mean == (0.1,) * 3  # the config's own values win
    with pytest.raises(ConfigError, match="unknown"):
        model_preprocess({**vit, "preprocess": {"size": 224}})
    with pytest.raises(ConfigError, match="Fix: give model.preprocess"):
        model_preprocess({"_target_": "histoflow.models.AlexNet32", "preprocess": AUTO})


def test_timm_model_trains_with_its_own_preprocessing(tmp_path: Path) -> None:
    make_images(tmp_path / "images", per_class=4, size=(72, 72))
    overrides = [f"data.root={tmp_path / 'images'}", f"paths.data_dir={tmp_path / 'work'}", "protocol=images",
                 "data.split.k=2", "model=timm", "model.name=resnet18", "model.preprocess.input_size=48",
                 "++data.loader.num_workers=0", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger=csv"]
    metrics = train(compose_train(overrides, tmp_path / "run"))
    checkpoint = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    loader = checkpoint["ShardDataModule"]["loader"]
    resnet = timm.data.resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg("resnet18").to_dict())
    # the weights' mean, std and interpolation; the side this config gave instead of the pretrained 224
    assert loader["normalize"] == "fixed" and loader["mean"] == list(resnet["mean"]) and loader["std"] == list(
        resnet["std"])
    assert loader["resize"] == 48 and loader["interpolation"] == resnet["interpolation"]
    assert checkpoint["hyper_parameters"]["input_size"] == 48


def test_torchvision_encoder_and_head_nets() -> None:
    encoder, dim = build_encoder({"_target_": "histoflow.models.torchvision_model", "name": "resnet18",
                                  "weights": None, "preprocess": {"input_size": 64}}, 64)
    assert dim == 512 and not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert torchvision_model("squeezenet1_1", 0)(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    head = build_net({"_target_": "histoflow.models.LinearHead", "in_features": None}, 3, 64, in_features=dim)
    assert head(torch.zeros(4, dim)).shape == (4, 3)
    with pytest.raises(ConfigError, match="encoder="):
        build_net({"_target_": "histoflow.models.MLPHead", "in_features": None}, 3, 64)


def test_fixed_normalisation_and_resize_of_a_pretrained_encoders_input() -> None:
    import numpy as np

    from histoflow.data.transforms import PatchTransform

    stats = {"mean_image": np.zeros((36, 36, 3))}
    patches = np.zeros((2, 36, 36, 3), dtype=np.uint8)
    patches[..., 0], patches[..., 1] = 255, 51  # red 1.0, green 0.2, blue 0.0 in 0-1 units
    transform = PatchTransform(32, stats, "fixed", mean=[0.5, 0.2, 0.1], std=[0.25, 0.5, 0.1], resize=72,
                               interpolation="bicubic")
    out = transform(patches)
    assert out.shape == (2, 3, 72, 72) and transform.out_side == 72
    torch.testing.assert_close(out[:, 0], torch.full((2, 72, 72), 2.0))  # (1.0 - 0.5) / 0.25
    torch.testing.assert_close(out[:, 1], torch.zeros(2, 72, 72), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 2], torch.full((2, 72, 72), -1.0))
    with pytest.raises(ConfigError, match="data.loader.mean and data.loader.std"):
        PatchTransform(32, stats, "fixed", mean=[0.5] * 3)
    with pytest.raises(ConfigError, match="interpolation"):
        PatchTransform(32, stats, "none", resize=64, interpolation="lanczos")


def test_an_encoders_errors_name_the_encoder_keys(tmp_path: Path) -> None:
    """Issue 29: an offline or mistyped `encoder=timm` named model.name / model.weights, the head's keys."""
    from histoflow.models import build_encoder

    with pytest.raises(MissingInputError, match=r"^encoder.weights file '/nonexistent/w.pth' does not exist"):
        build_encoder({"_target_": "histoflow.models.timm_model", "name": "resnet18",
                       "weights": "/nonexistent/w.pth"}, 64)
    with pytest.raises(ConfigError, match=r"^encoder.name=no_such_net_xyz"):
        build_encoder({"_target_": "histoflow.models.timm_model", "name": "no_such_net_xyz"}, 64)
