"""`prepare` when things go wrong around it: prepares started together, an image changed in place, a full disk, a
damaged or deleted shard, a killed run's pool workers, a second writer waiting for the first."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import config, make_images
from filelock import FileLock

from histoflow.common.errors import DamagedFileError, HistoflowError
from histoflow.data import shards
from histoflow.data.locks import only_writer
from histoflow.data.prepare import prepare_dataset
from histoflow.data.problems import BadInputError


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under a prepared folder but its timing record, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "dataset.json" and not p.name.startswith(".")}



def test_concurrent_prepares_all_succeed_and_equal_a_clean_run(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=20, size=(320, 256))
    data = config(root, tmp_path / "shared", shards={"samples_per_shard": 16})
    script = f"from histoflow.data.prepare import prepare_dataset; prepare_dataset({data!r}, quiet=True)"
    procs, t0 = [], time.monotonic()
    for delay in (0.0, 0.2, 0.5, 1.0):  # the fold jobs of a sweep, started by a launcher moments apart
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        procs.append(subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outputs)
    clean = prepare_dataset(config(root, tmp_path / "clean", shards={"samples_per_shard": 16}), quiet=True)
    folders = [f for f in (tmp_path / "shared").iterdir() if not f.name.startswith(".")]
    assert [f.name for f in folders] == [clean.path.name]
    assert _tree(folders[0]) == _tree(clean.path)
    assert not list(folders[0].glob("shards/.*.tmp"))



def _tiff_images(root: Path) -> Path:
    """Uncompressed TIFFs: every image of the same size has the same number of bytes, like Kather's tiles."""
    return make_images(root, per_class=4, size=(80, 64), seed=1, suffix=".tif")



def test_same_size_replacement_gives_a_new_folder_and_the_checks_run(tmp_path: Path) -> None:
    root = _tiff_images(tmp_path / "images")
    first = prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    target, other = root / "CLL" / "CLL-0.tif", root / "FL" / "FL-0.tif"
    before = target.stat()
    target.write_bytes(other.read_bytes())  # same size, other pixels: an FL image filed as CLL
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or rsync keep the old time
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(BadInputError, match="conflicting-labels"):  # the duplicate check ran on the new bytes
        prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    again = prepare_dataset(config(root, tmp_path / "prepared", on_bad_image="skip"), quiet=True)
    assert again.path != first.path and again.record["images"] == first.record["images"] - 2



def test_unchanged_images_are_not_hashed_again(tmp_path: Path, monkeypatch) -> None:
    from histoflow.data import fingerprint

    monkeypatch.setattr(fingerprint, "RACY_S", 0.0)  # else an image changed in the last 2 s is hashed again
    root = make_images(tmp_path / "images")
    data = config(root, tmp_path / "prepared")
    first = prepare_dataset(data, quiet=True)
    hashed, real = [], fingerprint.sha256_file
    monkeypatch.setattr(fingerprint, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert prepare_dataset(data, quiet=True).path == first.path
    assert hashed == []
    (root / "FL" / "FL-1.png").touch()  # a new status: read again, the same bytes, the same folder
    assert prepare_dataset(data, quiet=True).path == first.path
    assert hashed == ["FL-1.png"]



def test_a_full_disk_names_the_folder_and_leaves_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    root = make_images(tmp_path / "images")
    add, calls = shards.TarShard.add, []

    def fill_up(self, name: str, data: bytes) -> None:
        calls.append(name)
        if len(calls) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        add(self, name, data)

    monkeypatch.setattr(shards.TarShard, "add", fill_up)
    with pytest.raises(HistoflowError, match="no space left") as info:
        prepare_dataset(config(root, tmp_path / "prepared"), quiet=True)
    shard_dir = next((tmp_path / "prepared").iterdir()) / "shards"
    assert str(shard_dir) in str(info.value) and "data.shards.dir" in str(info.value)
    assert list(shard_dir.glob(".*")) == []
    monkeypatch.setattr(shards.TarShard, "add", add)  # space freed: the run resumes
    assert prepare_dataset(config(root, tmp_path / "prepared"), quiet=True).record["images"] == 18



@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_prepare_writes_a_damaged_or_missing_shard_again(tmp_path: Path, damage: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29.3: the loader's fix for a damaged shard is to re-run prepare, which once found the folder prepared,
    rewrote nothing, and left train and embed to a FileNotFoundError traceback."""
    root = make_images(tmp_path / "images", per_class=6, size=(96, 80))
    data = config(root, tmp_path / "prepared", shards={"samples_per_shard": 16})
    first = prepare_dataset(data, quiet=True)
    before = _tree(first.path)
    shard = first.path / "shards" / first.record["shards"][1]["file"]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1500])
        with pytest.raises(DamagedFileError, match="re-run prepare"):
            list(shards.tar_samples([{"url": str(shard)}]))
    else:
        shard.unlink()
    again = prepare_dataset(data, quiet=True)
    assert again.path == first.path and _tree(again.path) == before  # the same bytes as the first run wrote
    assert shard.name in caplog.text and "writing them again" in caplog.text
    assert len(list(shards.tar_samples([{"url": str(shard)}]))) == first.record["shards"][1]["samples"]



def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for PID 1, which may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False



@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_pool_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    """Issue 29.4: `kill -9` of a running prepare left its two pool workers (~400 MB each) asleep forever."""
    script = f"""
import os, sys, time
from pathlib import Path
from histoflow.common.progress import process_map
def task(i):
    Path({str(tmp_path)!r}, f"worker-{{os.getpid()}}").touch()
    time.sleep(120)
list(process_map(task, [0, 1], 2))
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)



def test_a_second_writer_says_it_waits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 29: a second concurrent embed waited ~45 s for the first without a word."""
    lock_file = tmp_path / ".embed.lock"
    held = FileLock(lock_file)
    held.acquire()
    done = threading.Event()

    def second() -> None:
        with only_writer(lock_file, f"embeds into {tmp_path}"):
            done.set()

    waiter = threading.Thread(target=second)
    with caplog.at_level("INFO", logger="histoflow.data.locks"):
        waiter.start()
        while not caplog.records and waiter.is_alive():
            waiter.join(0.05)
        assert not done.is_set()  # it waits for the holder ...
        held.release()
        waiter.join(30)
    assert done.is_set()  # ... and goes on once it is gone, having said so
    assert f"waiting for another process that embeds into {tmp_path}" in caplog.text
