"""Prepare speed of histoflow vs the lymphoma tutorial's way (one PNG file per patch, then a tar).

    python benchmarks/bench_prepare.py [--data DIR] [--workers N] [--out DIR]

Both are timed twice: inside this process, and as whole processes started from the shell, start-up
(interpreter, imports, Hydra, the process pool) included, as a user meets them:
`histoflow prepare data=lymphoma ...` against a script doing the tutorial's steps (this file with
--tutorial-only). --data names the folder holding lymphoma/ (default $HISTOFLOW_DATA, else ../shared/data beside
the repo). Everything is written into a fresh temporary folder under --out and deleted afterwards, so nothing is
cached between runs. Also times the shard writer alone: prepare's shards written again from their own members with
TarShard and with wds.TarWriter (both byte-identical to prepare's; the whole comparison is bench_shards.py).
Exits 0 whatever the numbers (a benchmark, not a test); 2 without data.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from histoflow.data.dataset import PreparedDataset
from histoflow.data.shards import TarShard, decode_npy, sample_key, tar_samples

REPO = Path(__file__).resolve().parents[1]
N_DECODE = 20_000


def config(lymphoma: Path, work: Path, workers: int) -> dict:
    """The lymphoma data config, reading from `lymphoma` and writing into `work`."""
    cfg = OmegaConf.load(REPO / "conf" / "data" / "lymphoma.yaml")
    cfg.root, cfg.cache_dir, cfg.shards.dir, cfg.shards.workers = str(lymphoma), str(work / "cache"), str(work), workers
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("_target_")
    return data


def settle() -> None:
    """Write back what the last contender wrote (60,000 PNG files for the tutorial) before the next is timed:
    otherwise the kernel's writeback lands in the next one's time (seconds, measured)."""
    os.sync()
    time.sleep(1.0)


def run_histoflow(lymphoma: Path, work: Path, workers: int):
    """Time one whole prepare (check + hash + folds + shards + means) into an empty folder."""
    from histoflow.data.prepare import (
        prepare_dataset,  # here: the tutorial's process below does not import it
    )

    data = config(lymphoma, work, workers)
    settle()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds = prepare_dataset(data, quiet=True)
    return time.perf_counter() - t0, ds


def run_histoflow_process(lymphoma: Path, work: Path, workers: int) -> float:
    """Seconds of `histoflow prepare data=lymphoma ...` into an empty folder, start-up included."""
    command = [sys.executable, "-m", "histoflow", "prepare", "data=lymphoma", f"data.root={lymphoma}",
               f"data.shards.dir={work}", f"data.shards.workers={workers}", f"paths.cache_dir={work / 'cache'}",
               f"hydra.run.dir={work / 'run'}"]
    settle()
    t0 = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t0


def run_tutorial_process(prepared: Path, work: Path) -> float:
    """Seconds of the tutorial's steps as a script of their own (the folds read from `prepared`'s manifest)."""
    settle()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--tutorial-only", str(prepared), str(work)], check=True)
    return time.perf_counter() - t0


def run_tutorial(ds, work: Path, size: int, stride: int, rotations: list[int]) -> tuple[float, int]:
    """Tutorial steps 1-2: loop over grid positions and rotations, one PNG file per patch, then tar them."""
    settle()
    t0, n = time.perf_counter(), 0
    folds = sorted({r["fold"] for r in ds.manifest()})
    for r in ds.manifest():
        image = np.asarray(Image.open(ds.root / r["image"]).convert("RGB"))
        folder = work / f"fold{r['fold']}" / r["label"]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = image.shape[:2]
        for y in range(0, h - size + 1, stride):
            for x in range(0, w - size + 1, stride):
                for rot in rotations:
                    patch = np.rot90(image[y:y + size, x:x + size], k=rot // 90)
                    Image.fromarray(np.ascontiguousarray(patch)).save(
                        folder / f"{sample_key(r['index'], x, y, rot)}.png", "PNG")
                    n += 1
    for f in folds:
        with wds.TarWriter(str(work / f"fold{f}.tar"), encoder=False) as tar:
            for c, label in enumerate(ds.classes):
                for p in sorted((work / f"fold{f}" / label).glob("*.png")):
                    tar.write({"__key__": p.stem, "png": p.read_bytes(), "cls": b"%d" % c})
    return time.perf_counter() - t0, n


def members(tars: list[Path], ext: str, keys=None) -> dict[str, bytes]:
    """Payloads with this extension from tar files, by sample key (all, or only `keys`, up to N_DECODE)."""
    out: dict[str, bytes] = {}
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf:
                key, _, e = m.name.partition(".")
                if e == ext and (keys is None or key in keys):
                    out[key] = tf.extractfile(m).read()
                    if len(out) == (len(keys) if keys else N_DECODE):
                        return out
    return out


def writer_seconds(tars: list[Path], work: Path, rounds: int = 2) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of writing the shards' members again, as they are, with TarShard and with
    wds.TarWriter (alternating); each copy must equal prepare's file byte for byte."""
    shards = [list(tar_samples([{"url": str(t)}])) for t in tars]
    work.mkdir(parents=True, exist_ok=True)

    def tarshard(f, samples):
        tar = TarShard(f)
        for s in samples:
            tar.add(f"{s['__key__']}.cls", s["cls"])
            tar.add(f"{s['__key__']}.npy", s["npy"])
        tar.close()

    def tarwriter(f, samples):
        with wds.TarWriter(f, encoder=False, user="histoflow", group="histoflow", mtime=0) as w:
            for s in samples:
                w.write({"__key__": s["__key__"], "cls": s["cls"], "npy": s["npy"]})

    contenders = {"TarShard": tarshard, "wds.TarWriter": tarwriter}
    best = dict.fromkeys(contenders, (float("inf"), float("inf")))
    for r in range(rounds):
        for name in list(contenders) if r % 2 == 0 else list(contenders)[::-1]:
            write = contenders[name]
            settle()
            t0, c0 = time.perf_counter(), time.process_time()
            for t, samples in zip(tars, shards):
                with open(work / t.name, "wb") as f:
                    write(f, samples)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            assert all((work / t.name).read_bytes() == t.read_bytes() for t in tars), f"{name} wrote other bytes"
    return best


def workers(n: int) -> str:
    return f"{n} worker{'s' * (n > 1)}"


def rate(fn, payloads: list[bytes]) -> float:
    t0 = time.perf_counter()
    for b in payloads:
        fn(b)
    return len(payloads) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("HISTOFLOW_DATA", str(REPO.parent / "shared" / "data")),
                    help="folder holding lymphoma/ (or the lymphoma folder itself)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the parallel histoflow run")
    ap.add_argument("--out", default=None, help="where the temporary folder goes (default: the system temp)")
    ap.add_argument("--tutorial-only", nargs=2, metavar=("PREPARED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tutorial_only:  # the tutorial's way as a process of its own, timed by the parent
        ds = PreparedDataset(args.tutorial_only[0])
        p = ds.record["settings"]["patches"]
        run_tutorial(ds, Path(args.tutorial_only[1]), p["size"], p["stride"], p["rotations"])
        return 0
    data = Path(args.data).expanduser()
    lymphoma = data if (data / "CLL").is_dir() else data / "lymphoma"
    if not all(any((lymphoma / c).glob("*.png")) for c in ("CLL", "FL", "MCL")):
        print(f"lymphoma data not found: {lymphoma} must hold CLL/ FL/ MCL/ with PNG images. "
              "Fix: pass --data (or set HISTOFLOW_DATA) to the folder holding lymphoma/", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]  # before we start: other processes sharing the cores
    for f in lymphoma.rglob("*.png"):  # page cache warm for every contender alike
        f.read_bytes()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.out))
    try:
        results = {}
        for w in sorted({1, args.workers}):
            results[w] = run_histoflow(lymphoma, tmp / f"histoflow-w{w}", w)
        secs, ds = results[args.workers]
        n_img, n_patch = ds.record["images"], ds.record["samples"]
        p = ds.record["settings"]["patches"]
        t_secs, t_n = run_tutorial(ds, tmp / "tutorial", p["size"], p["stride"], p["rotations"])
        assert t_n == n_patch, f"tutorial cut {t_n} patches, histoflow {n_patch}"
        # whole processes, side by side in this run: each started from the shell into an empty folder
        whole = run_histoflow_process(lymphoma, tmp / "histoflow-process", args.workers)
        t_whole = run_tutorial_process(ds.path, tmp / "tutorial-process")

        npy = members(sorted((ds.path / "shards").glob("*.tar")), "npy")
        png = members(sorted((tmp / "tutorial").glob("*.tar")), "png", set(npy))
        keys = list(npy)
        assert all(np.array_equal(decode_npy(npy[k]), np.asarray(Image.open(io.BytesIO(png[k])))) for k in keys[:200])
        npy_rate = rate(decode_npy, [npy[k] for k in keys])
        png_rate = rate(lambda b: np.asarray(Image.open(io.BytesIO(b))), [png[k] for k in keys])
        writer = writer_seconds(sorted((ds.path / "shards").glob("*.tar")), tmp / "writer")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"lymphoma: {n_img} images -> {n_patch} patches ({p['size']} px, stride {p['stride']}, "
          f"rotations {p['rotations']}); {os.cpu_count()} cores, load average at start {load:.1f}\n")
    print(f"{'prepare':<32}{'seconds':>9}{'images/s':>10}{'patches/s':>11}{'vs tutorial':>13}")
    rows = [(f"histoflow, {workers(w)}", s) for w, (s, _) in results.items()]
    for name, s in rows + [("tutorial (PNG files + tar)", t_secs)]:
        print(f"{name:<32}{s:>9.2f}{n_img / s:>10.0f}{n_patch / s:>11.0f}{t_secs / s:>12.1f}x")
    print(f"{'histoflow, whole process':<32}{whole:>9.2f}{n_img / whole:>10.0f}{n_patch / whole:>11.0f}"
          f"{t_whole / whole:>12.1f}x  (histoflow prepare, {workers(args.workers)}, start-up included)")
    print(f"{'tutorial, whole process':<32}{t_whole:>9.2f}{n_img / t_whole:>10.0f}{n_patch / t_whole:>11.0f}"
          f"{1:>12.1f}x")
    if len(results) > 1:
        print(f"speed-up from {args.workers} workers: {results[1][0] / secs:.2f}x")
    print(f"\n{'read back ' + str(len(keys)) + ' patches':<32}{'patches/s':>11}")
    print(f"{'.npy (decode_npy)':<32}{npy_rate:>11.0f}\n{'PNG (PIL)':<32}{png_rate:>11.0f}"
          f"\n.npy decodes {npy_rate / png_rate:.1f}x faster than PNG\n")
    print(f"{'write the ' + str(n_patch) + ' patches again':<32}{'seconds':>9}{'patches/s':>11}{'CPU s':>8}  "
          "(the same bytes, one process; best of 2)")
    for name, (s, cpu) in writer.items():
        print(f"{name:<32}{s:>9.2f}{n_patch / s:>11.0f}{cpu:>8.2f}")
    (ours, ours_cpu), (theirs, theirs_cpu) = writer["TarShard"], writer["wds.TarWriter"]
    print(f"TarShard writes {theirs / ours:.1f}x faster ({theirs_cpu / ours_cpu:.1f}x in CPU time); its {ours:.2f} s "
          f"against prepare's {results[1][0]:.2f} s with 1 worker\n")
    speed, ratio, whole_ratio = n_patch / secs, t_secs / secs, t_whole / whole
    for ok, what in [(ratio >= 5, f"histoflow ({workers(args.workers)}) >= 5x the tutorial: {ratio:.1f}x"),
                     (whole_ratio >= 5, f"whole processes: histoflow >= 5x the tutorial: {whole_ratio:.1f}x"),
                     (speed >= 10_000, f"histoflow ({workers(args.workers)}) >= 10,000 patches/s: {speed:,.0f}")]:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
