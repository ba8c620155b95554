"""Streaming the prepared shards: batches, epoch lengths, every test patch once, normalisation, HED jitter, a loader
worker's error shown without the worker's traceback."""

from __future__ import annotations

import random
import signal
import tarfile
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CLASSES, make_images
from omegaconf import OmegaConf
from skimage.color import hed2rgb, rgb2hed

from histoflow.common.errors import ConfigError, DamagedFileError, message
from histoflow.data.datamodule import ShardDataModule
from histoflow.data.loader_config import LoaderConfig
from histoflow.data.pipeline import KEY_FIELDS, shard_pipeline
from histoflow.data.shards import decode_npy, parse_key
from histoflow.data.transforms import (
    PatchTransform,
    build_transform,
    colour_jitter,
    hed_jitter,
)
from histoflow.testing.stain import hed_to_rgb, rgb_to_hed

REPO = Path(__file__).resolve().parents[1]
SKIMAGE_UNITS = -np.log(1e-6)  # skimage's stain units are optical densities divided by this


def cpu_trainer(rank: int, world_size: int) -> SimpleNamespace:
    """What the DataModule asks of its trainer: rank, world size, device and processes on this host."""
    return SimpleNamespace(global_rank=rank, world_size=world_size, num_devices=world_size,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def coloured_images(root: Path, per_class: int = 6, size: tuple[int, int] = (132, 100)) -> Path:
    """Noisy PNGs whose class shows in the colour: class c has channel c bright."""
    return make_images(root, per_class, size, pixels="channel")


def data_config(root: Path, out: Path, samples_per_shard: int = 40, val_fraction: float = 0.5, **loader) -> dict:
    return {"name": "tiny", "root": str(root), "classes": CLASSES, "labels": "folder",
            "split": {"kind": "kfold", "k": 3, "val_fraction": val_fraction, "seed": 0},
            "patches": {"size": 36, "stride": 32, "rotations": [0, 90]},
            "shards": {"dir": str(out), "samples_per_shard": samples_per_shard, "workers": 1},
            "loader": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 100, **loader}}


def datamodule(data: dict, fold: str = "1", **loader) -> ShardDataModule:
    dm = ShardDataModule(fold=fold, **{**data, "loader": {**data["loader"], **loader}})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def shard_samples(paths: list[str]) -> list[tuple[str, np.ndarray, int]]:
    """(key, patch, label) of every sample in these shards, in file order, read with tarfile."""
    out = []
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = list(dict.fromkeys(name.split(".", 1)[0] for name in members))
        out += [(k, decode_npy(members[f"{k}.npy"]), int(members[f"{k}.cls"])) for k in keys]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("datamodule")
    return data_config(coloured_images(tmp / "images"), tmp / "prepared")


@pytest.fixture
def alarm():
    """Fail instead of hanging: a loader that deadlocks raises TimeoutError after 60 s."""
    def fail(*_):
        raise TimeoutError("the loader hung")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_training_batch(data: dict) -> None:
    dm = datamodule(data, normalize="none")
    assert (dm.classes, dm.num_classes, dm.input_size) == (CLASSES, 3, 32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 36, 36, 3) and x.dtype == torch.uint8  # shipped raw, transformed after transfer
    x = dm.transform(train=True)(x)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) < 3
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    # the brightest channel is the class: labels stayed with their patches through shuffle and collate
    assert torch.equal(x.mean(dim=(2, 3)).argmax(dim=1), y)


def test_epoch_length_with_uneven_shards(data: dict, alarm) -> None:
    dm = datamodule(data)
    sizes = [s["samples"] for s in dm.prepared.record["shards"]]
    assert len(set(sizes)) > 1, "the test needs shards of unequal size"
    n = dm.split.samples["train"] // 16
    loader = dm.train_dataloader()
    assert dm.epoch_batches() == len(loader) == n
    for _ in range(2):  # the second epoch restarts the stream: full batches again, no early end
        batches = [len(y) for _, y in loader]
        assert batches == [16] * n
    two_workers = datamodule(data, num_workers=2, epoch_batches=7).train_dataloader()
    for _ in range(3):  # persistent workers across epochs
        assert [len(y) for _, y in two_workers] == [16] * 7


def test_training_stream_covers_every_patch_once_per_pass(data: dict) -> None:
    dm = datamodule(data)
    # no shuffle buffer: it would carry a few patches over each pass boundary
    stream = shard_pipeline(dm.split.train, dm.transform(train=True), 16, train=True, with_keys=True)
    n = dm.split.samples["train"] // 16
    assert n * 16 == dm.split.samples["train"], "the test needs whole batches"
    random.seed(0)  # the shard orders come from `random` (here, of the main process)
    keys = [tuple(k) for _, _, batch in islice(stream, 2 * n) for k in batch.tolist()]
    for one_pass in (keys[:len(keys) // 2], keys[len(keys) // 2:]):
        assert len(one_pass) == len(set(one_pass)) == dm.split.samples["train"]
    assert keys[:len(keys) // 2] != keys[len(keys) // 2:], "each pass draws a new shard order"


def test_every_rank_gets_the_same_number_of_batches(data: dict, alarm) -> None:
    dm = datamodule(data, num_workers=2)
    counts = []
    for rank in range(3):  # more ranks x workers than training shards
        dm.trainer = cpu_trainer(rank, 3)
        counts.append(sum(1 for _ in dm.train_dataloader()))
    dm.trainer = None
    assert counts == [dm.split.samples["train"] // (16 * 3)] * 3


def test_same_seed_same_batches(data: dict, alarm) -> None:
    import pytorch_lightning as L

    runs = []
    for seed in (0, 0, 1):
        L.seed_everything(seed, workers=True, verbose=False)
        loader = datamodule(data, num_workers=2, epoch_batches=3).train_dataloader()
        runs.append(torch.cat([x for _ in range(2) for x, _ in loader]))  # two epochs
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("world_size", [2, 5])
def test_ranks_share_the_evaluation_shards(data: dict, world_size: int) -> None:
    dm = datamodule(data)
    keys = []
    for rank in range(world_size):
        dm.trainer = cpu_trainer(rank, world_size)
        keys.append([tuple(k) for _, _, batch in dm.eval_dataloader("test", with_keys=True) for k in batch.tolist()])
    dm.trainer = None
    assert all(keys), "every rank evaluates something"
    if world_size <= len(dm.split.test):  # each sample on exactly one rank
        assert sorted(sum(keys, [])) == sorted(set(sum(keys, []))) and len(sum(keys, [])) == dm.split.samples["test"]
    else:  # fewer shards than ranks: every rank evaluates all of them
        assert all(sorted(k) == sorted(keys[0]) for k in keys) and len(keys[0]) == dm.split.samples["test"]


@pytest.mark.parametrize("workers", [0, 2])
def test_test_loader_yields_every_sample_once(data: dict, workers: int, alarm) -> None:
    dm = datamodule(data, num_workers=workers, eval_batch_size=7)
    expected = sorted((tuple(parse_key(k).values()), label) for k, _, label in shard_samples(dm.split.test))
    seen = []
    for x, y, keys in dm.predict_dataloader():
        assert keys.shape == (len(y), len(KEY_FIELDS)) and x.shape == (len(y), 36, 36, 3)
        seen += [(tuple(k), int(c)) for k, c in zip(keys.tolist(), y)]
    assert sorted(seen) == expected
    assert sum(len(y) for _, y in dm.test_dataloader()) == len(expected) == dm.split.samples["test"]


def test_eval_transform_is_centre_crop_minus_mean(data: dict) -> None:
    dm = datamodule(data)
    samples = shard_samples(dm.split.test)
    x, y, keys = dm.on_after_batch_transfer(next(iter(dm.predict_dataloader())), 0)
    mean = torch.as_tensor(dm.stats["mean_image"], dtype=torch.float32)
    for i, (key, patch, label) in enumerate(samples[:len(y)]):  # one process: shard order
        assert tuple(keys[i].tolist()) == tuple(parse_key(key).values()) and int(y[i]) == label
        expected = ((torch.tensor(patch[2:34, 2:34]).float() - mean[2:34, 2:34]) / 255).permute(2, 0, 1)
        assert torch.equal(x[i], expected)


def test_training_transform_is_a_crop_and_flip_of_patch_minus_mean(data: dict) -> None:
    dm = datamodule(data)
    patches = torch.from_numpy(np.stack([p for _, p, _ in shard_samples(dm.split.train[:1])[:32]]))
    out = dm.transform(train=True)(patches)
    centred = (patches.float() - torch.as_tensor(dm.stats["mean_image"], dtype=torch.float32)) / 255
    for patch, crop in zip(centred.permute(0, 3, 1, 2), out):
        candidates = [patch[:, t:t + 32, s:s + 32] for t in range(5) for s in range(5)]
        candidates = [c.flip(dims) for c in candidates for dims in ([], [1], [2], [1, 2])]
        assert any(torch.allclose(crop, c, atol=1e-6) for c in candidates)


def test_normalisation_centres_the_training_set(data: dict) -> None:
    for normalize, std in (("image", None), ("channel", 1.0)):
        dm = datamodule(data, normalize=normalize)
        x = torch.cat([dm.on_after_batch_transfer(batch, 0)[0] for batch in dm.eval_dataloader("train")])
        assert len(x) == dm.split.samples["train"]
        if normalize == "image":  # exactly the training mean image, cropped alike
            assert x.mean(dim=0).abs().max() < 1e-5
        else:  # channel statistics are of whole patches, the loader gives centre crops
            assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1
            assert torch.allclose(x.std(dim=(0, 2, 3)), torch.full((3,), std), atol=0.1)


def test_hed_conversions_match_skimage() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    hed = rgb_to_hed(torch.from_numpy(rgb))
    np.testing.assert_allclose(hed.clamp(min=0).numpy(), rgb2hed(rgb), atol=1e-12)
    np.testing.assert_allclose(hed_to_rgb(torch.from_numpy(rgb2hed(rgb))).numpy(), hed2rgb(rgb2hed(rgb)) * 255,
                               atol=1e-9)
    np.testing.assert_allclose(hed_to_rgb(hed).numpy(), rgb, atol=1e-3)  # unclipped: a round trip (0 -> 255e-6)


def test_hed_jitter() -> None:
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8))
    assert torch.equal(hed_jitter(x, 0.0), x.float())
    torch.manual_seed(0)
    jittered = hed_jitter(x, 0.1)
    assert torch.isfinite(jittered).all() and 0 <= float(jittered.min()) and float(jittered.max()) <= 255
    assert (jittered - x).abs().mean() > 1
    # the one-map shortcut equals unmix -> s * a + b (optical densities) -> mix, with the same draws
    torch.manual_seed(0)
    alpha = 1 + (torch.rand(4, 3, dtype=torch.float64) * 2 - 1) * 0.1
    beta = (torch.rand(4, 3, dtype=torch.float64) * 2 - 1) * 0.1
    density = rgb_to_hed(x.permute(0, 2, 3, 1)) * SKIMAGE_UNITS
    expected = hed_to_rgb((density * alpha[:, None, None] + beta[:, None, None]) / SKIMAGE_UNITS)
    torch.testing.assert_close(jittered, expected.permute(0, 3, 1, 2).float(), atol=0.05, rtol=0)
    transform = PatchTransform(32, {"mean_image": np.full((36, 36, 3), 128.0)}, train=True, hed_jitter=0.05)
    assert torch.isfinite(transform(torch.randint(0, 256, (8, 36, 36, 3), dtype=torch.uint8))).all()


def test_colour_jitter() -> None:
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (64, 3, 8, 8), dtype=np.uint8))
    assert torch.equal(colour_jitter(x), x.float())  # zero strength: identity
    torch.manual_seed(0)
    out = colour_jitter(x, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 255
    assert (out - x).abs().mean() > 3
    # each patch's picture is kept: strongly correlated with its source
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(x.float().numpy(), out.numpy())]
    assert np.median(corr) > 0.8
    # grey stays grey under saturation and hue; brightness alone scales
    grey = torch.full((4, 3, 5, 5), 100.0)
    torch.testing.assert_close(colour_jitter(grey, saturation=0.5, hue=0.5), grey)
    torch.manual_seed(1)
    bright = colour_jitter(grey, brightness=0.5)
    factors = bright[:, 0, 0, 0] / 100
    assert ((factors >= 0.5) & (factors <= 1.5)).all() and factors.std() > 0
    torch.testing.assert_close(bright, grey * factors[:, None, None, None])
    # hue turns red into other colours
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 200.0
    torch.manual_seed(2)
    turned = colour_jitter(red, hue=0.5)
    assert turned[0, 1:].sum() > 1  # red became some other hue
    transform = PatchTransform(32, {"mean_image": np.full((36, 36, 3), 128.0)}, train=True,
                               jitter={"brightness": 0.2, "hue": 0.05})
    assert torch.isfinite(transform(torch.randint(0, 256, (8, 36, 36, 3), dtype=torch.uint8))).all()
    with pytest.raises(ValueError, match="unknown key"):
        PatchTransform(32, {"mean_image": np.zeros((36, 36, 3))}, jitter={"gamma": 0.1})


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core test machine
def test_fewer_shards_than_workers(tmp_path: Path, alarm) -> None:
    data = data_config(coloured_images(tmp_path / "images"), tmp_path / "prepared", samples_per_shard=10_000,
                       num_workers=4)
    dm = datamodule(data)
    assert (len(dm.split.train), len(dm.split.val), len(dm.split.test)) == (2, 2, 2)  # all fewer than the 4 workers
    loader = dm.train_dataloader()
    for _ in range(2):
        assert sum(1 for _ in loader) == dm.epoch_batches()
    assert sum(len(y) for _, y in dm.val_dataloader()) == dm.split.samples["val"]
    assert sum(len(y) for _, y, _ in dm.predict_dataloader()) == dm.split.samples["test"]


@pytest.mark.parametrize("val_fraction", [0.5, 0.0])
def test_lightning_fit(tmp_path: Path, data: dict, val_fraction: float) -> None:
    import pytorch_lightning as L

    class Linear(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(3 * 32 * 32, 3)
            self.validated = 0

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

        def validation_step(self, batch, _):
            self.validated += len(batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    if val_fraction:
        dm = ShardDataModule(fold=2, **data)
    else:  # no validation images: no validation loader, and fit runs all the same
        dm = ShardDataModule(fold=2, **data_config(coloured_images(tmp_path / "images"), tmp_path / "prepared",
                                                   val_fraction=0.0))
    model = Linear()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == dm.epoch_batches()
    assert trainer.global_step == 2 * dm.epoch_batches()
    assert model.validated == 2 * dm.split.samples["val"]
    assert (dm.val_dataloader() == []) == (val_fraction == 0)
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # the eval transform travels with the weights
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["ShardDataModule"]
    assert state["classes"] == CLASSES and state["loader"]["crop"] == 32
    assert torch.equal(state["stats"]["mean_image"], torch.as_tensor(dm.stats["mean_image"]))


def test_built_from_the_data_config(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache")}, "fold": 3,
                            "data": OmegaConf.load(REPO / "conf" / "data" / "lymphoma.yaml")})
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, fold=cfg.fold)
    assert isinstance(dm, ShardDataModule) and dm.fold == "3"
    assert dm.loader.batch_size == cfg.data.loader.batch_size and dm.loader.normalize == "image"
    assert dm.data["shards"]["dir"] == f"{tmp_path}/prepared" and isinstance(dm.data["split"], dict)
    with pytest.raises(ValueError, match="unknown key"):
        ShardDataModule(fold=1, loader={"batch_sise": 8})


def test_imagenet_normalisation_is_torchvisions() -> None:
    patches = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (2, 36, 36, 3), dtype=np.uint8))
    out = PatchTransform(None, {"mean_image": np.zeros((36, 36, 3))}, "imagenet")(patches)
    expected = (patches.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("flips", "rows_flip", "cols_flip"), [(True, True, True), ("horizontal", False, True),
                                                              (False, False, False)])
def test_flips_both_axes_or_mirror_only(flips: bool | str, rows_flip: bool, cols_flip: bool) -> None:
    side = 8
    yy, xx = np.mgrid[:side, :side]
    patch = np.stack([yy * 10, xx * 10, np.zeros_like(yy)], axis=-1).astype(np.uint8)  # R: row, G: column
    batch = torch.from_numpy(np.repeat(patch[None], 200, axis=0))
    torch.manual_seed(0)
    out = PatchTransform(None, {"mean_image": np.zeros((side, side, 3))}, "none", train=True, flips=flips)(batch)
    row_reversed = out[:, 0, 0, 0] > out[:, 0, -1, 0]
    col_reversed = out[:, 1, 0, 0] > out[:, 1, 0, -1]
    assert bool(row_reversed.any()) == rows_flip and bool(col_reversed.any()) == cols_flip
    with pytest.raises(ValueError, match="expected true"):
        PatchTransform(None, {"mean_image": np.zeros((side, side, 3))}, train=True, flips="vertical")


def test_scale_divides_after_the_mean_as_caffe_mean_file() -> None:
    patches = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (2, 36, 36, 3), dtype=np.uint8))
    mean = np.full((36, 36, 3), 100.0)
    raw = PatchTransform(None, {"mean_image": mean}, "image", scale=1.0)(patches)
    torch.testing.assert_close(raw, patches.permute(0, 3, 1, 2).float() - 100.0)
    torch.testing.assert_close(PatchTransform(None, {"mean_image": mean}, "image")(patches), raw / 255.0)
    with pytest.raises(ValueError, match="data.loader.scale"):
        PatchTransform(None, {"mean_image": mean, "channel_mean": [0, 0, 0], "channel_std": [1, 1, 1]}, "channel",
                       scale=1.0)


def test_grey_input_is_the_luma_minus_the_grey_mean_in_every_channel() -> None:
    patches = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (2, 36, 36, 3), dtype=np.uint8))
    mean = np.random.default_rng(7).uniform(0, 255, (36, 36, 3))
    luma = torch.tensor([0.299, 0.587, 0.114])
    out = build_transform({"crop": None, "normalize": "image", "scale": 1.0, "grey": True}, {"mean_image": mean},
                          train=False)(patches)
    expected = torch.einsum("c,bhwc->bhw", luma, patches.float()) - torch.einsum("c,hwc->hw", luma,
                                                                                 torch.tensor(mean).float())
    for channel in range(3):
        torch.testing.assert_close(out[:, channel], expected, atol=1e-3, rtol=1e-5)
    grey_patch = torch.full((1, 36, 36, 3), 100, dtype=torch.uint8)
    tinted = grey_patch.clone()
    tinted[..., 0], tinted[..., 1] = 159, 70  # another colour, the same luma (+59 * 0.299 - 30 * 0.587 = 0.03)
    stain_free = build_transform({"crop": None, "grey": True, "normalize": "none"}, {"mean_image": mean}, False)
    torch.testing.assert_close(stain_free(tinted), stain_free(grey_patch), atol=0.5 / 255, rtol=0)
    with pytest.raises(ValueError, match="grey=true with normalize=channel"):
        build_transform({"normalize": "channel", "grey": True}, {"mean_image": mean, "channel_mean": [0, 0, 0],
                                                                 "channel_std": [1, 1, 1]}, train=False)


def test_a_transform_takes_its_defaults_and_checks_from_the_loader_config() -> None:
    """build_transform reads a data.loader mapping (a checkpoint's) through LoaderConfig: its defaults, its checks."""
    stats = {"mean_image": np.full((36, 36, 3), 128.0)}
    given, default = build_transform({}, stats, train=False), build_transform(LoaderConfig(), stats, train=False)
    assert vars(given).keys() == vars(default).keys()
    for name, value in vars(default).items():
        assert torch.equal(value, vars(given)[name]) if torch.is_tensor(value) else value == vars(given)[name], name
    with pytest.raises(ConfigError, match="data.loader.crpo: unknown key"):
        build_transform({"crpo": 32}, stats, train=False)


class _DamagedShards(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise DamagedFileError("shard 1-fit-00000.tar: truncated member. Fix: delete the shard and re-run prepare")
        yield



def test_an_error_of_a_loader_worker_is_shown_without_the_worker_traceback() -> None:
    with pytest.raises(DamagedFileError) as info:
        list(torch.utils.data.DataLoader(_DamagedShards(), num_workers=1))
    assert "Traceback" in str(info.value)  # what torch re-raises
    assert message(info.value) == "shard 1-fit-00000.tar: truncated member. Fix: delete the shard and re-run prepare"
