"""Folders that several jobs may want to write (the fold jobs of a sweep, started together): checked writable
before any work, then one writer at a time; the others wait for its lock, saying so, then find the work done."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from histoflow.common.errors import NotWritableError

log = logging.getLogger(__name__)


@contextmanager
def only_writer(lock_file: Path, what: str, wait: bool = True) -> Iterator[bool]:
    """Hold `lock_file` while the body runs; where another process holds it, log that this one waits for it (`what`
    it does, e.g. "prepares <folder>"). The lock of a killed holder goes with its process. With `wait=False` the
    body runs at once, told whether it holds the lock (False: another process does; do something else first)."""
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            yield False
            return
        log.info("waiting for another process that %s (its lock: %s)", what, lock_file)
        lock.acquire()
    try:
        yield True
    finally:
        lock.release()


def writable(folder: Path, what: str, fix: str) -> None:
    """Make `folder` (and its parents) and check that a file can be written in it; else a NotWritableError naming
    `what` would be written there and the `fix`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a name of this process and thread alone: two jobs checking one folder never remove each other's probe
        probe = folder / f".write-test-{os.getpid()}-{threading.get_ident()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise NotWritableError(f"{folder}: cannot write {what} here ({e.strerror}). Fix: {fix}") from e
