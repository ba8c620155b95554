"""Long work shown as it goes: rich progress bars with a rate, and a map over worker processes."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def progress_bar(enabled: bool = True, download: bool = False) -> Progress:
    """Rich progress whose tasks show a `rate` field (e.g. images/s) beside the count and the times; `download`:
    bytes received and the transfer speed instead, the bar gone once done."""
    counts = (DownloadColumn(), TransferSpeedColumn()) if download else (MofNCompleteColumn(),
                                                                         TextColumn("{task.fields[rate]}"))
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *counts, TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=download)


def process_map(fn: Callable, items: list, workers: int) -> Iterator:
    """fn over items, in order, in worker processes when there is more than one worker."""
    if workers <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    # the platform's default start method: fork on Linux, as DataLoader workers use, so no re-imports
    with ProcessPoolExecutor(workers, initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8)))


def exit_with_parent(parent: int, period: float = 1.0) -> None:
    """Pool-worker initializer: end this worker once the process that started it is gone. A worker waits on its
    task queue, whose pipe it holds both ends of, so a `kill -9` of prepare would leave it asleep forever with its
    memory (a polling thread, not a parent-death signal: that one fires when the forking thread ends)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
