"""The shard format, written and read in one place: WebDataset tar shards of `.cls` + `.npy` samples.

Each sample is two tar members, `<image>-<x>-<y>-<rot>.cls` (class index) and `.npy` (a patch, or a patch's
features), the layout `wds.TarWriter` writes and `wds.WebDataset` reads. TarShard writes it and tar_samples reads
it, 3-4 and 8-14 times faster than webdataset's tarfile-based pair (benchmarks/bench_shards.py).

Every shard is written under a temporary name and renamed when complete (atomic_shard), so an interrupted run
redoes only the shards it had not finished. Patches are stored as .npy (lossless; decoding is a header parse and a
buffer view, ten times faster than PNG, see benchmarks/bench_prepare.py). What goes into a shard of patches:
data/packing.py.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from histoflow.common.errors import DamagedFileError, HistoflowError


class DiskFullError(HistoflowError, OSError):
    """The disk filled up while prepared data was written; the message names the folder."""


def sample_key(image: int, x: int, y: int, rot: int) -> str:
    """The sample's key carries its provenance; dot-free, as WebDataset splits keys at the first dot."""
    return f"{image:06d}-{x:05d}-{y:05d}-{rot:03d}"


def parse_key(key: str) -> dict[str, int]:
    """Manifest index of the image, patch origin (x, y) and rotation of a sample, from its key."""
    image, x, y, rot = (int(v) for v in key.rsplit("/", 1)[-1].split("-"))
    return {"image": image, "x": x, "y": y, "rot": rot}


@functools.lru_cache(maxsize=64)
def _npy_prefix(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # magic, version, header length and header, as np.save writes them


def encode_npy(patch: np.ndarray) -> bytes:
    """The .npy file of a patch (what np.save writes), with the header of each shape built once."""
    return _npy_prefix(patch.shape, np.lib.format.dtype_to_descr(patch.dtype)) + np.ascontiguousarray(patch).tobytes()


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    buf = io.BytesIO(head)
    major, _ = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read_header(buf)


def decode_npy(data: bytes) -> np.ndarray:
    """Read an .npy payload as a read-only view; the header of a run of equal patches is parsed once."""
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    shape, fortran, dtype = _npy_header(bytes(data[:end]))
    arr = np.frombuffer(data, dtype=dtype, offset=end, count=int(np.prod(shape)))
    return arr.reshape(shape, order="F" if fortran else "C")


class TarShard:
    """Writes plain ustar members (regular files), the very bytes Python's tarfile writes, 3-4 times faster.

    tarfile (under wds.TarWriter) spends ~25 us building each 512-byte header, two per patch, which
    was half of the whole prepare step (benchmarks/bench_prepare.py); here a header is a template with
    name, size and checksum filled in. The loader reads these members directly (tar_samples).
    Measured against wds.TarWriter on the same bytes (3.2-4.1x): benchmarks/bench_shards.py, docs/benchmarks.md.
    """

    BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE

    def __init__(self, fileobj, user: str = "histoflow", mode: int = 0o444) -> None:
        self.f, self.written = fileobj, 0
        info = tarfile.TarInfo("")
        info.mode, info.uname, info.gname, info.mtime = mode, user, user, 0
        template = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
        template[148:156] = b" " * 8  # the checksum is computed over the header with this field as spaces
        self.template = bytes(template)

    def add(self, name: str, data: bytes) -> None:
        encoded = name.encode()
        if len(encoded) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name}")
        header = bytearray(self.template)
        header[0:len(encoded)] = encoded
        header[124:136] = b"%011o\0" % len(data)
        header[148:156] = b"%06o\0 " % sum(header)
        pad = -len(data) % self.BLOCK
        self.f.write(b"".join((header, data, b"\0" * pad)))
        self.written += self.BLOCK + len(data) + pad

    def close(self) -> None:
        """Two zero blocks end the archive; pad to a whole record as tarfile does."""
        end = self.written + 2 * self.BLOCK
        self.f.write(b"\0" * (2 * self.BLOCK + -end % self.RECORD))


def tar_samples(src: Iterable[dict]) -> Iterator[dict]:
    """Samples of local tar shards, as wds.tarfile_to_samples gives them ({"__key__", "__url__", ext: bytes}),
    8-14 times faster (benchmarks/bench_shards.py, docs/benchmarks.md).

    Python's tarfile spends ~20 us on each 512-byte header, two per patch, and webdataset's generic
    grouping of members into samples as much again: together they capped the loader below 20,000
    patches/s per worker. The shards prepare writes hold only plain ustar members, a sample's members
    next to each other (TarShard), read and grouped directly here.
    """
    for item in src:
        url = item["url"]
        with open(url, "rb") as f:
            buf = f.read()
        pos, sample = 0, None
        while pos + 512 <= len(buf) and buf[pos] != 0:  # a zero block ends the archive
            size = int(buf[pos + 124:pos + 136].rstrip(b"\0 ") or b"0", 8)
            kind = buf[pos + 156:pos + 157]
            if kind not in (b"0", b"\0") or pos + 512 + size > len(buf):
                problem = f"member type {kind!r}" if kind not in (b"0", b"\0") else "truncated member"
                raise DamagedFileError(f"{url}: {problem} at byte {pos}; the loader reads plain, complete tar members. "
                                       "Fix: re-run prepare with the same data options (it writes missing "
                                       "and damaged shards again)")
            name = buf[pos:pos + 100].split(b"\0", 1)[0].decode()
            if buf[pos + 345] != 0:  # ustar prefix of a long path
                name = buf[pos + 345:pos + 500].split(b"\0", 1)[0].decode() + "/" + name
            dot = name.find(".", name.rfind("/") + 1)  # webdataset's rule: the key ends at the basename's first dot
            key, ext = (name[:dot], name[dot + 1:]) if dot >= 0 else (name, "")
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = buf[pos + 512:pos + 512 + size]
            pos += 512 + (size + 511) // 512 * 512
        if pos + 512 > len(buf):  # cut between members: no zero block ends the archive
            raise DamagedFileError(f"{url}: truncated at byte {len(buf)} (no end-of-archive block); the loader reads "
                                   "complete shards. Fix: re-run prepare with the same data options (it writes "
                                   "missing and damaged shards again)")
        if sample is not None:
            yield sample


def stack_npy(payloads: list[bytes]) -> np.ndarray:
    """Decode and stack .npy payloads into one (B, ...) array, 45-57 times faster than np.stack of np.load on a
    shard's batches (benchmarks/bench_shards.py, docs/benchmarks.md)."""
    # equal headers (the rule in a shard) are parsed once and the pixels joined in one copy
    first = decode_npy(payloads[0])
    start = len(payloads[0]) - first.nbytes
    head = payloads[0][:start]
    if first.flags.c_contiguous and all(len(p) == len(payloads[0]) and p[:start] == head for p in payloads):
        pixels = bytearray().join([memoryview(p)[start:] for p in payloads])  # writable, as torch wants
        return np.frombuffer(pixels, dtype=first.dtype).reshape(len(payloads), *first.shape)
    return np.stack([decode_npy(p) for p in payloads])


def add_sample(tar: TarShard, key: str, label: int, array: np.ndarray) -> None:
    """One sample: its class index and its array, in webdataset's member order (sorted extensions)."""
    tar.add(f"{key}.cls", b"%d" % label)
    tar.add(f"{key}.npy", encode_npy(array))


@contextlib.contextmanager
def atomic_shard(path: Path) -> Iterator[TarShard]:
    """A TarShard written under a temporary name beside `path` and renamed to it when the block ends without
    error: a shard file that exists is complete, whatever interrupted the writer (kill -9 included)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            tar = TarShard(f)
            yield tar
            tar.close()
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path.parent}: no space left on the device while writing {path.name}. Fix: free "
                                "space there (the run resumes with the shards written so far), or set "
                                "data.shards.dir to a folder on a larger disk") from e
        raise
    tmp.replace(path)
