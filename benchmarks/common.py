"""What the benchmark scripts share: the device they time on, timing that waits for it, and their figures as JSON
(read by benchmarks/gpu_check.py)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from histoflow.common.machine import resolve_device


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--device (auto: the GPU when there is one) and --json (write the figures there)."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")


def device_of(name: str) -> torch.device:
    """The device named (auto resolved); a CUDA device that is not there is refused by name."""
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here. Fix: --device cpu (or auto)")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    """The device in words, for the first line of a benchmark's output."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} torch threads"


def write_figures(path: Path | None, figures: dict[str, Any]) -> None:
    """Write the figures as JSON (NaN and infinities as null) when a path is given."""
    if path is None:
        return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in figures.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2) + "\n")
