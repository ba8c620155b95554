"""Files written whole or not at all: a temporary name beside the target, renamed over it when the writing ends."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write, unique to this process and thread (two writers never share one),
    renamed to `path` when the block ends without error and removed when it fails: a file that exists is whole,
    whatever killed its writer (kill -9 leaves only a `.<name>.*.tmp` file). `durable`: the file and the rename
    are fsynced, so a power cut does not lose them either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)  # the rename itself reaches the disk


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
