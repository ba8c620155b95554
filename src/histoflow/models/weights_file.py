"""Reading a local weights file (.pth, .pt, .bin, .ckpt, .safetensors) into a state dict, without running pickled
code; a file that is not one (truncated by a copy, a text or HTML page saved under the name, a whole pickled model
rather than its state dict) is refused naming the file, what it is, and the fix."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from histoflow.common.errors import HistoflowError


class WeightsFileError(HistoflowError, ValueError):
    """A weights file that cannot be read as a state dict; the message names the file and the fix."""


FIX = ("Fix: copy or download the weights file again (compare its size or sha256 with the source's), or point "
       "{key} at another file; a whole pickled model must be saved as its state dict: "
       "torch.save(model.state_dict(), path)")


def read_weights_file(path: str | Path, key: str = "model.weights") -> Mapping[str, Any]:
    """The mapping of names to tensors that a weights file holds (a training checkpoint's `state_dict` as it is,
    left to the caller); WeightsFileError naming `path` and `key` (the setting that named it) otherwise."""
    path = Path(path)
    fix = FIX.format(key=key)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsFileError(f"{key}={path}: not a readable safetensors file ({e}). {fix}") from e
    head = path.read_bytes()[:64] if path.stat().st_size else b""
    if not head:
        raise WeightsFileError(f"{key}={path}: the file is empty. {fix}")
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):  # weights (zip, pickle) begin with binary bytes
        shown = head.decode("utf-8", "replace").strip().splitlines()[0][:40]
        raise WeightsFileError(f"{key}={path}: a text file (it begins {shown!r}), not weights: perhaps an error "
                               f"page or a Git LFS pointer saved in its place. {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e).lower():
            raise WeightsFileError(f"{key}={path}: holds pickled objects beyond tensors (a whole pickled model?), "
                                   f"which could run code when loaded, so it is not read. {fix}") from e
        raise WeightsFileError(f"{key}={path}: not a PyTorch weights file ({_first_line(e)}). {fix}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        truncated = any(w in str(e) for w in ("failed finding central directory", "unexpected EOF", "Ran out of input",
                                              "file read failed", "truncated"))
        what = "truncated (cut short by a copy or download)" if truncated or isinstance(e, EOFError) else \
            f"not a readable PyTorch weights file ({_first_line(e)})"
        raise WeightsFileError(f"{key}={path}: {what}. {fix}") from e
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"{key}={path}: holds a {type(state).__name__}, not a state dict of named tensors. "
                               f"{fix}")
    return state


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(
        ("Weights only load failed", "Check the documentation", "Please file"))]
    return (lines[-1] if lines else type(error).__name__)[:200]


def check_encoder_weights(encoder_cfg: Mapping[str, Any]) -> None:
    """Read an encoder config's local weights file, if it names one, so that a damaged one fails before any folder
    is made for its features (the same error as building the encoder)."""
    weights = encoder_cfg.get("weights")
    if weights and Path(str(weights)).expanduser().is_file():
        read_weights_file(Path(str(weights)).expanduser(), "encoder.weights")
