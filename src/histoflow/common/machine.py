"""The machine: the device a model runs on, and worker counts for `num_workers: auto` (training loader,
prediction, slides).

Measured on the 2-core CPU of this project (benchmarks/bench_train.py): the in-process shard loader reads
~110,000 patches/s, 40 times what the net's training step consumes, while two loader processes take cores from
the step's threads (end-to-end 0.83 of the step with 2 workers). So on a CPU the data are read in the training
process (0 workers). Beside a GPU the step runs on the device and the CPU is free to decode: each device's
process gets loader workers, one CPU left for the process itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from histoflow.common.errors import ConfigError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
MAX_WORKERS = 8  # beyond this, worker start-up and memory cost more than they give on these small patches


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask under SLURM or taskset), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_workers(device_type: str, processes: int = 1, cpus: int | None = None) -> int:
    """Loader processes for each of `processes` model processes on a host with `cpus` CPUs: 0 when the model
    runs on the CPU; else the CPUs per model process less one, at most MAX_WORKERS."""
    if device_type == "cpu":
        return 0
    per_process = (cpus or cpu_count()) // max(processes, 1)
    return max(0, min(MAX_WORKERS, per_process - 1))


def resolve_workers(setting: int | str, key: str, device_type: str, processes: int = 1) -> int:
    """An int setting as it is; `auto` from the machine (auto_workers). Anything else is refused by key."""
    if setting == AUTO:
        return auto_workers(device_type, processes)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(f"{key}={setting!r}: expected auto or a number of processes (0: read in this process)")
    return setting


def resolve_device(device: str, key: str = "device") -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise the device named, which must be there."""
    import torch  # here: prepare, which reads the worker counts above, never needs torch (1.6 s of its start-up)

    if device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        named = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"{key}={device!r}: not a device ({e}). Fix: auto, cpu, cuda or cuda:N") from None
    if named.type == "cuda" and not (torch.cuda.is_available() and (named.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"{key}={device}: no such CUDA device here ({torch.cuda.device_count()} found). Fix: "
                          f"{key}=auto (the GPU when there is one) or {key}=cpu")
    return named
