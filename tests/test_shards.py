"""The shard format's hand-written writer, reader and decoder give what webdataset's and numpy's give
(their speed against those is benchmarks/bench_shards.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds

from histoflow.data.shards import (
    add_sample,
    atomic_shard,
    encode_npy,
    sample_key,
    stack_npy,
    tar_samples,
)


def samples(kind: str, n: int = 50) -> list[tuple[str, int, np.ndarray]]:
    rng = np.random.default_rng(7)
    if kind == "patches":
        arrays = rng.integers(0, 256, (n, 36, 36, 3), dtype=np.uint8)
    else:
        arrays = rng.standard_normal((n, 512), dtype=np.float32)
    return [(sample_key(i % 5, 32 * i, 64, 90 * (i % 4)), i % 3, arrays[i]) for i in rng.permutation(n)]


@pytest.mark.parametrize("kind", ["patches", "features"])
def test_tarshard_writes_webdatasets_bytes_and_tar_samples_reads_them_as_webdataset(tmp_path, kind):
    written = samples(kind)
    with atomic_shard(tmp_path / "ours.tar") as tar:
        for key, label, array in written:
            add_sample(tar, key, label, array)
    with wds.TarWriter(str(tmp_path / "wds.tar"), user="histoflow", group="histoflow", mtime=0) as w:
        for key, label, array in written:
            w.write({"__key__": key, "cls": label, "npy": array})
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "wds.tar").read_bytes()

    urls = [str(tmp_path / "ours.tar"), str(tmp_path / "wds.tar")]
    ours = list(wds.DataPipeline(wds.SimpleShardList(urls), tar_samples))
    theirs = [{k: v for k, v in s.items() if k != "__local_path__"}
              for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]
    assert len(ours) == 2 * len(written) and ours == theirs
    assert [s["__key__"] for s in ours[:len(written)]] == [key for key, _, _ in written]
    for s, (_, label, array) in zip(ours, written):
        assert int(s["cls"]) == label and np.array_equal(np.load(io.BytesIO(s["npy"])), array)


@pytest.mark.parametrize("kind", ["patches", "features"])
def test_stack_npy_equals_stacked_np_load(kind):
    payloads = [encode_npy(array) for _, _, array in samples(kind)]
    want = np.stack([np.load(io.BytesIO(b)) for b in payloads])
    got = stack_npy(payloads)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert got.flags.writeable  # torch.from_numpy takes it without a warning
    # payloads whose headers differ (a Fortran-ordered patch, a version 2.0 header) take the per-sample path
    odd = np.load(io.BytesIO(payloads[3]))
    mixed = payloads[:3] + [_npy(np.asfortranarray(odd)) if odd.ndim > 1 else _npy(odd, version=(2, 0))]
    start = len(payloads[0]) - odd.nbytes  # the header's length
    assert mixed[3][:start] != payloads[0][:start]
    assert np.array_equal(stack_npy(mixed), np.stack([np.load(io.BytesIO(b)) for b in mixed]))


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    return buf.getvalue()
