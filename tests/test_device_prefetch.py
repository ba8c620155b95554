"""Batches copied to the device one step ahead (data/device_prefetch.py): the loader's batches in order, one pulled
ahead, its length, every epoch; the stream order of the CUDA path (with stand-in streams: no GPU here); the DataModule's
loaders under data.loader.device_prefetch; a training with it forced on (on the CPU) ends where one without ends."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_train, make_images
from test_datamodule import data_config, datamodule

from histoflow.common.errors import ConfigError
from histoflow.data import device_prefetch
from histoflow.data.device_prefetch import DevicePrefetcher
from histoflow.data.loader_config import LoaderConfig
from histoflow.training.run import train


class Recording:
    """A loader of `batches` that logs each pull (and each new epoch) in `log`, with a length."""

    def __init__(self, batches: list, log: list | None = None) -> None:
        self.batches, self.log = batches, [] if log is None else log

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.log.append("epoch")
        for i, batch in enumerate(self.batches):
            self.log.append(f"pull {i}")
            yield batch


def nested_batches(n: int) -> list:
    """Batches of every shape Lightning moves: a tuple with a string, a dict holding a list, a bare tensor."""
    out = []
    for i in range(n):
        x = torch.full((2, 3), i, dtype=torch.uint8)
        out.append([(x, torch.tensor([i, -i]), f"batch {i}"),
                    {"x": x.float(), "keys": [torch.arange(i + 1), i]},
                    torch.tensor(float(i))][i % 3])
    return out


def assert_same(a, b) -> None:
    """Equal nested batches: the same structure, equal tensors (dtype too), equal other values."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    else:
        assert a == b


def test_the_loaders_batches_in_order_with_its_length_every_epoch() -> None:
    batches = nested_batches(7)
    loader = Recording(batches)
    prefetched = DevicePrefetcher(loader, "cpu")
    assert len(prefetched) == 7
    for epoch in range(2):  # iterated anew each epoch, as Lightning does
        got = list(prefetched)
        assert len(got) == 7
        for a, b in zip(got, batches):
            assert_same(a, b)
    assert loader.log.count("epoch") == 2 and loader.log.count("pull 6") == 2  # every batch pulled once an epoch


def test_a_loader_without_a_length_gives_none_to_lightning() -> None:
    from lightning_fabric.utilities.data import sized_len

    prefetched = DevicePrefetcher(iter(nested_batches(2)), "cpu")
    assert sized_len(prefetched) is None  # Lightning's own probe: a TypeError, not a made-up length
    assert len(list(prefetched)) == 2


def test_the_next_batch_is_pulled_while_this_one_is_used() -> None:
    loader = Recording(nested_batches(4))
    batches = iter(DevicePrefetcher(loader, "cpu"))
    assert loader.log == [], "nothing is read before the first batch is asked for (Lightning reseeds first)"
    for i in range(4):
        next(batches)
        pulled = [int(e.split()[1]) for e in loader.log if e.startswith("pull")]
        assert pulled == list(range(min(i + 2, 4))), f"batch {i} handed out: one ahead pulled, no more"
    with pytest.raises(StopIteration):
        next(batches)
    assert loader.log.count("epoch") == 1


class StandInStream:
    """A CUDA stream's part in the prefetcher, logged: no GPU here. `current` is the stream torch.cuda.stream sets."""

    current: StandInStream | None = None

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait_stream(self, other: StandInStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


def test_on_cuda_each_batch_waits_for_its_copy_and_is_kept_for_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream order, with stand-in streams: the copy of batch N+1 is queued on the side stream after the step's
    stream waits for batch N's copy (so that wait does not hold the step back for N+1), and every tensor of batch N
    is recorded on the step's stream before it is handed out (the allocator keeps its memory until the step ends)."""
    log: list[str] = []
    main, side = StandInStream(log, "main"), StandInStream(log, "side")

    @contextlib.contextmanager
    def on_stream(stream: StandInStream):
        StandInStream.current = stream
        yield
        StandInStream.current = main

    def copy(batch, device):
        log.append(f"copy {int(batch[0].flatten()[0])} on {StandInStream.current.name}")
        return batch

    def record(tensor: torch.Tensor, stream: StandInStream) -> None:
        log.append(f"record {int(tensor.flatten()[0])} on {stream.name}")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)
    monkeypatch.setattr(device_prefetch, "move_data_to_device", copy)
    monkeypatch.setattr(torch.Tensor, "record_stream", record)
    StandInStream.current = main
    batches = [(torch.full((2,), i), torch.full((2,), i)) for i in range(3)]
    for i, _ in enumerate(DevicePrefetcher(batches, "cuda:0")):
        log.append(f"step {i}")
    expected = ["copy 0 on side"]
    for i in range(3):
        expected += ["main waits for side", f"record {i} on main", f"record {i} on main"]
        expected += [f"copy {i + 1} on side"] if i < 2 else []
        expected += [f"step {i}"]
    assert log == expected


@pytest.mark.parametrize("setting, device, on", [("auto", "cuda", True), ("auto", "cpu", False),
                                                 (True, "cpu", True), (False, "cuda", False)])
def test_the_setting_resolves_for_the_device(setting, device: str, on: bool) -> None:
    assert LoaderConfig(device_prefetch=setting).prefetches(device) is on


@pytest.mark.parametrize("value", ["yes", 1])
def test_a_setting_other_than_auto_true_false_is_refused_by_key(value) -> None:
    with pytest.raises(ConfigError, match=r"data\.loader\.device_prefetch="):
        LoaderConfig.from_config({"device_prefetch": value})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("prefetch")
    return data_config(make_images(tmp / "images", 6, (132, 100), pixels="channel"), tmp / "prepared")


def trainer_on(device: str) -> SimpleNamespace:
    """What the DataModule asks of its trainer, on a root device (each DDP rank's own)."""
    return SimpleNamespace(global_rank=0, world_size=1, num_devices=1,
                           strategy=SimpleNamespace(root_device=torch.device(device)))


def test_the_datamodule_prefetches_where_the_setting_says(data: dict) -> None:
    dm = datamodule(data)  # auto
    dm.trainer = trainer_on("cpu")
    assert not isinstance(dm.train_dataloader(), DevicePrefetcher)
    dm.trainer = trainer_on("cuda:1")  # built only, not iterated: there is no GPU here
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader, DevicePrefetcher) and loader.device == torch.device("cuda:1")
    forced = datamodule(data, device_prefetch=True, epoch_batches=5)
    loader, plain = forced.train_dataloader(), datamodule(data, device_prefetch=False).train_dataloader()
    assert isinstance(loader, DevicePrefetcher) and not isinstance(plain, DevicePrefetcher)
    assert len(loader) == 5
    for _ in range(2):
        assert [len(y) for _, y in loader] == [16] * 5
    assert sum(len(y) for _, y, _ in forced.predict_dataloader()) == forced.split.samples["test"]


def test_a_training_with_prefetch_on_ends_where_one_without_ends(tmp_path: Path, leave_no_trace: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two epochs of the real training (transform with random crops and flips, validation, test) on the CPU, with
    device_prefetch forced on and off: the same weights at the end, the same test metrics."""
    iterations: list[int] = []
    original = DevicePrefetcher.__iter__

    def counted(self):
        iterations.append(1)
        return original(self)

    monkeypatch.setattr(DevicePrefetcher, "__iter__", counted)
    images = make_images(tmp_path / "images", per_class=6, size=(132, 100), pixels="tint", digits=3)
    ends, metrics = [], []
    for on in (True, False):
        iterations.clear()
        run = tmp_path / f"run-{on}"
        overrides = [f"data.root={images}", "data.shards.samples_per_shard=30", "data.shards.workers=1",
                     "++data.loader.batch_size=16", "++data.loader.num_workers=0", "++data.loader.shuffle_buffer=64",
                     f"++data.loader.device_prefetch={str(on).lower()}", f"paths.data_dir={tmp_path / 'work'}",
                     f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}",
                     "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                     "logger=csv"]
        metrics.append(train(compose_train(overrides, run)))
        ends.append(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True))
        assert bool(iterations) is on, "the prefetcher ran exactly when it was on"
    assert ends[0]["global_step"] == ends[1]["global_step"] == 2 * 3
    for key, value in ends[0]["state_dict"].items():
        assert torch.equal(value, ends[1]["state_dict"][key]), f"{key} differs with device_prefetch on"
    numbers = [{k: v for k, v in m.items() if isinstance(v, float)} for m in metrics]  # not the run's own paths
    assert "test/loss" in numbers[0] and numbers[0] == numbers[1]
