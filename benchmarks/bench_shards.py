"""The shard format's hand-written parts against webdataset's and numpy's, on shards shaped like prepare's and embed's.

    python benchmarks/bench_shards.py [--shards N] [--rounds N] [--out DIR] [--check]

Two kinds of shard, synthesised (content does not change the speed of an uncompressed tar): lymphoma patches
(36x36x3 uint8, 4096 samples a shard, batches of 128, as conf/data/lymphoma.yaml) and frozen features (512 float32,
the same 4096 samples a shard, batches of 256, as the frozen experiments). Each sample is `<key>.cls` + `<key>.npy`,
the keys shuffled as prepare writes them. Timed, in samples/s:

  write   histoflow.data.shards.TarShard + add_sample (encode_npy) against wds.TarWriter fed the same bytes
          (encoder=False), and wds.TarWriter with its own encoder (int class, the array); all three must write
          byte-identical files (TarWriter with user/group histoflow and mtime 0). Also the .npy encoding alone:
          encode_npy against webdataset's numpy_dumps (numpy.lib.format.write_array).
  read    tar_samples against wds.tarfile_to_samples(), each as the stage of a wds.DataPipeline over the same urls,
          reading and grouping members into samples; both must give the same keys, extensions and bytes.
  decode  stack_npy on each batch's .npy payloads against np.stack of np.load(io.BytesIO(b)), of webdataset's
          default .npy decoder (webdataset.autodecode.npy_loads) and of histoflow's own per-sample decode_npy;
          all must give equal arrays (dtype and shape included).

Contenders alternate within each round, their order reversed every other round, and each one's best round counts:
on a machine shared with other work timings only get slower. Rates are given both in wall time and in this process's
CPU time (user + system: what other processes on the cores do not inflate); the ratios are of the CPU rates.
Everything is written into a temporary folder under --out (default: the system temp) and deleted afterwards.
Exits 0 whatever the numbers unless --check is given (then 1 where a hand-written part is not >= 1.5x the library).
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds
from webdataset.autodecode import npy_loads
from webdataset.writer import numpy_dumps

from histoflow.data.shards import (
    TarShard,
    add_sample,
    decode_npy,
    encode_npy,
    sample_key,
    stack_npy,
    tar_samples,
)

CLEAR_MARGIN = 1.5  # a hand-written part is worth keeping where it is at least this much faster (CPU time)
SAMPLES_PER_SHARD = 4096


@dataclass(frozen=True)
class Kind:
    name: str
    shape: tuple[int, ...]
    dtype: str
    batch: int


KINDS = (Kind("patches 36x36x3 uint8", (36, 36, 3), "uint8", 128), Kind("features 512 float32", (512,), "float32", 256))


def synthesise(kind: Kind, n_shards: int, seed: int = 0) -> list[list[tuple[str, int, np.ndarray]]]:
    """(key, class, array) of each shard, the keys shuffled as prepare's are."""
    rng = np.random.default_rng(seed)
    shards = []
    for s in range(n_shards):
        if kind.dtype == "uint8":
            arrays = rng.integers(0, 256, (SAMPLES_PER_SHARD, *kind.shape), dtype=np.uint8)
        else:
            arrays = rng.standard_normal((SAMPLES_PER_SHARD, *kind.shape), dtype=np.float32)
        # 30 images a shard, a grid of origins, four rotations: keys as sample_key makes them
        keys = [sample_key(s * 30 + i % 30, 32 * (i // 120), 32 * (i // 4 % 30), 90 * (i % 4))
                for i in range(SAMPLES_PER_SHARD)]
        order = rng.permutation(SAMPLES_PER_SHARD)
        shards.append([(keys[i], int(i % 3), arrays[i]) for i in order])
    return shards


# --- contenders; each returns the number of samples it handled --------------------------------------------------

def write_tarshard(shards, paths) -> int:
    for samples, path in zip(shards, paths):
        with open(path, "wb") as f:
            tar = TarShard(f)
            for key, label, array in samples:
                add_sample(tar, key, label, array)
            tar.close()
    return sum(map(len, shards))


def write_tarwriter_bytes(shards, paths) -> int:
    for samples, path in zip(shards, paths):
        with open(path, "wb") as f, wds.TarWriter(f, encoder=False, user="histoflow", group="histoflow", mtime=0) as w:
            for key, label, array in samples:
                w.write({"__key__": key, "cls": b"%d" % label, "npy": encode_npy(array)})
    return sum(map(len, shards))


def write_tarwriter_encoder(shards, paths) -> int:
    for samples, path in zip(shards, paths):
        with open(path, "wb") as f, wds.TarWriter(f, user="histoflow", group="histoflow", mtime=0) as w:
            for key, label, array in samples:
                w.write({"__key__": key, "cls": label, "npy": array})
    return sum(map(len, shards))


def encoder(fn: Callable[[np.ndarray], bytes]):
    def run(shards, paths) -> int:
        for samples in shards:
            for _, _, array in samples:
                fn(array)
        return sum(map(len, shards))
    return run


def reader(stage):
    def run(urls) -> int:
        return sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), stage()))
    return run


def decoder(fn: Callable[[list[bytes]], np.ndarray], seconds: float = 0.25):
    """Passes over the batches until `seconds` have gone (stack_npy takes ~10 ms a pass: too short to time alone)."""
    def run(batches) -> int:
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            for b in batches:
                fn(b)
            n += sum(map(len, batches))
        return n
    return run


def stack_of(decode: Callable[[bytes], np.ndarray]) -> Callable[[list[bytes]], np.ndarray]:
    return lambda payloads: np.stack([decode(b) for b in payloads])


def np_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b))


# --- timing -------------------------------------------------------------------------------------------------------

def best_rates(contenders: dict[str, Callable[[], int]], rounds: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) samples/s of each contender over `rounds` alternating rounds."""
    best = {name: (0.0, 0.0) for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            n = contenders[name]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (max(best[name][0], n / wall), max(best[name][1], n / max(cpu, 1e-9)))
    return best


def table(title: str, rates: dict[str, tuple[float, float]], ours: str) -> list[tuple[str, float]]:
    """Print the rates and each one's ratio to `ours`; return (library contender, ours / it) pairs."""
    print(f"\n{title:<52}{'samples/s wall':>15}{'samples/s CPU':>15}{'ours / it':>11}")
    ratios = []
    for name, (wall, cpu) in rates.items():
        ratio = rates[ours][1] / cpu
        print(f"{name:<52}{wall:>15,.0f}{cpu:>15,.0f}{'' if name == ours else f'{ratio:.2f}x':>11}")
        if name != ours:
            ratios.append((name, ratio))
    return ratios


def samples_of(stage, urls) -> list[dict]:
    return [{k: bytes(v) if isinstance(v, (bytes, memoryview)) else v for k, v in s.items() if k != "__local_path__"}
            for s in wds.DataPipeline(wds.SimpleShardList(urls), stage)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2, help="shards of 4096 samples per kind and contender")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; each contender's best counts")
    parser.add_argument("--out", default=None, help="where the temporary folder goes (default: the system temp)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 where a hand-written part is < {CLEAR_MARGIN}x")
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, load average at start "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); Python {platform.python_version()}, "
          f"numpy {np.__version__}, webdataset {wds.__version__}")
    print(f"{args.shards} shards x {SAMPLES_PER_SHARD} samples per kind and contender, best of {args.rounds} "
          "alternating rounds")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.out))
    verdicts: list[tuple[str, str, str, float]] = []  # (kind, hand-written part, library, ratio)
    try:
        for kind in KINDS:
            shards = synthesise(kind, args.shards)
            n = args.shards * SAMPLES_PER_SHARD
            paths = {c: [tmp / f"{c}-{i:05d}.tar" for i in range(args.shards)] for c in ("ours", "bytes", "encoder")}
            print(f"\n== {kind.name}: {n:,} samples, .npy of {len(encode_npy(shards[0][0][2])):,} bytes")

            # write: the three writers, then the same bytes from each
            writers = {
                "histoflow TarShard + add_sample (encode_npy)": lambda: write_tarshard(shards, paths["ours"]),
                "wds.TarWriter(encoder=False), the same bytes": lambda: write_tarwriter_bytes(shards, paths["bytes"]),
                "wds.TarWriter, its own encoder": lambda: write_tarwriter_encoder(shards, paths["encoder"])}
            rates = best_rates(writers, args.rounds)
            for c in ("bytes", "encoder"):
                assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths["ours"], paths[c])), \
                    f"wds.TarWriter ({c}) wrote other bytes than TarShard"
            print("written files byte-identical: TarShard = TarWriter(bytes) = TarWriter(its encoder)")
            for name, ratio in table("write (tar + .npy encoding, to files)", rates, next(iter(writers))):
                verdicts.append((kind.name, "TarShard + add_sample", name, ratio))

            arrays = [a for _, _, a in shards[0]]
            assert all(encode_npy(a) == numpy_dumps(a) for a in arrays[:500]), "encode_npy != numpy_dumps"
            encoders = {"histoflow encode_npy": encoder(encode_npy),
                        "wds numpy_dumps (numpy.lib.format.write_array)": encoder(numpy_dumps)}
            rates = best_rates({k: (lambda f=f: f(shards, None)) for k, f in encoders.items()}, args.rounds)
            for name, ratio in table(".npy encoding alone (equal bytes)", rates, "histoflow encode_npy"):
                verdicts.append((kind.name, "encode_npy", name, ratio))

            # read + group, in the loader's pipeline
            urls = [str(p) for p in paths["ours"]]
            ours, theirs = samples_of(tar_samples, urls), samples_of(wds.tarfile_to_samples(), urls)
            assert len(ours) == len(theirs) == n and ours == theirs, "tar_samples != wds.tarfile_to_samples"
            print(f"\nread: tar_samples and wds.tarfile_to_samples give the same {n:,} samples "
                  "(keys, urls, extensions, bytes)")
            readers = {"histoflow tar_samples": reader(lambda: tar_samples),
                       "wds.tarfile_to_samples()": reader(wds.tarfile_to_samples)}
            rates = best_rates({k: (lambda f=f: f(urls)) for k, f in readers.items()}, args.rounds)
            for name, ratio in table("read + group into samples (page cache warm)", rates, "histoflow tar_samples"):
                verdicts.append((kind.name, "tar_samples", name, ratio))

            # decode each batch of the shards' .npy payloads
            payloads = [s["npy"] for s in ours]
            batches = [payloads[i:i + kind.batch] for i in range(0, len(payloads), kind.batch)]
            decoders = {"histoflow stack_npy": stack_npy, "np.stack(np.load(io.BytesIO(b)))": stack_of(np_load),
                        "np.stack(webdataset npy_loads(b))": stack_of(npy_loads),
                        "np.stack(histoflow decode_npy(b))": stack_of(decode_npy)}
            for name, fn in decoders.items():
                for b in batches:
                    got, want = fn(b), stack_of(np_load)(b)
                    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
            print(f"\ndecode: all four give equal arrays on every batch of {kind.batch} ({kind.dtype} {kind.shape})")
            rates = best_rates({k: (lambda f=decoder(f): f(batches)) for k, f in decoders.items()}, args.rounds)
            for name, ratio in table(f"decode batches of {kind.batch} into one array", rates, "histoflow stack_npy"):
                verdicts.append((kind.name, "stack_npy", name, ratio))
            own, load_ = rates["np.stack(histoflow decode_npy(b))"][1], rates["np.stack(np.load(io.BytesIO(b)))"][1]
            verdicts.append((kind.name, "decode_npy (per sample)", "np.load (per sample)", own / load_))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(f"hand-written part against the library, CPU-time ratio (>= {CLEAR_MARGIN}x: a clear margin):")
    missed = 0
    for kind, part, library, ratio in verdicts:
        if "histoflow" in library:  # stack_npy against histoflow's own per-sample decode: for information
            print(f"info  {kind}: {part} vs {library}: {ratio:.2f}x")
            continue
        ok = ratio >= CLEAR_MARGIN
        missed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {kind}: {part} vs {library}: {ratio:.2f}x")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
