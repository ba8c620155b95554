"""W&B that never hangs or crashes a run: offline unless it has a key and can reach its server."""

from __future__ import annotations

import logging
import netrc
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)
DEFAULT_HOST = "https://api.wandb.ai"


def _has_api_key(host: str) -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc (as `wandb login` writes it) holds the host's key."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(urlparse(host).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    """True when the W&B server answers an HTTP request within timeout_s (any status: it answered).

    A TCP connection alone is not enough: a proxy or a stalled server that accepts connections and never
    answers would make wandb.init wait and then fail the run.
    """
    try:
        urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=timeout_s).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts, refused connections, a malformed URL
        return False


def configure_wandb() -> str:
    """Set WANDB_MODE (offline without key or network), silence W&B and bound its start-up; return the mode."""
    # Quiet, no console capture (it fights Rich and multirun jobs), and a bounded wait for the local service.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    mode = os.environ.get("WANDB_MODE")
    if mode:  # the user's choice (online, offline, disabled) is honoured as given
        return mode
    host = os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)
    if not _has_api_key(host):
        reason = "no API key (WANDB_API_KEY or ~/.netrc)"
    elif not _reachable(host):
        reason = f"{host} is not reachable"
    else:
        os.environ["WANDB_MODE"] = "online"
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    log.info("W&B offline: %s; sync later with `wandb sync <run>/wandb/offline-run-*`", reason)
    return "offline"


def finish_wandb() -> None:
    """Close the current W&B run, if any, so the next multirun job starts its own run."""
    wandb = sys.modules.get("wandb")  # never import it just to close nothing
    if wandb is not None and wandb.run is not None:
        wandb.finish()
