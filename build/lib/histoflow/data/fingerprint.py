"""The content (sha256) of every source image, cheaply: a file whose status is unchanged is not read again.

The prepared folder is keyed by these hashes, so replacing an image by another of the same size gives a new
folder. Hashes are remembered in a small JSON file with each file's (size, mtime_ns, ctime_ns, inode, device).
Writing a file's bytes changes its ctime, and no call sets ctime back (restoring mtime with `cp -p` or rsync
sets it to now), so a matching status means unchanged bytes. Like git's index, a hash recorded less than
`RACY_S` after the file's last change is not trusted: a second write within one clock tick could keep every
time stamp.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

RACY_S = 2.0
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _status(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def content_hashes(paths: Sequence[Path], cache: Path, workers: int = 4) -> list[str]:
    """sha256 of each file, in order; unchanged files are answered from `cache`, which is then updated."""
    try:
        known: dict = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    now = time.time_ns()
    statuses = [_status(p.stat()) for p in paths]
    hashes: list[str | None] = []
    for p, st in zip(paths, statuses):
        entry = known.get(str(p))
        trusted = entry and entry["status"] == st and entry["at"] - max(st[1], st[2]) > RACY_S * 1e9
        hashes.append(entry["sha256"] if trusted else None)
    todo = [i for i, h in enumerate(hashes) if h is None]
    if todo:
        with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: threads read and hash in parallel
            for i, h in zip(todo, pool.map(sha256_file, [paths[i] for i in todo])):
                hashes[i] = h
        known.update({str(paths[i]): {"status": statuses[i], "sha256": hashes[i], "at": now} for i in todo})
        _write_atomically(cache, json.dumps(known))
    return hashes  # type: ignore[return-value]


def _write_atomically(path: Path, text: str) -> None:
    """Concurrent prepares may both update the cache: each writes its own temporary file, the last rename wins."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:  # only a cache: without it the next run hashes again
        pass
