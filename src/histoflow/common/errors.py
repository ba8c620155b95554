"""The project's own errors, and how the entry points show them.

A `HistoflowError` is bad input, a bad configuration or a missing file: its message names the file or key and
the fix, so `histoflow <command>` (and train.py, predict.py) print that message alone and exit with status 1.
Any other exception is a bug and keeps its traceback. `HYDRA_FULL_ERROR=1` shows the traceback of both.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class HistoflowError(Exception):
    """An error of the user's input or configuration whose message says what to do about it."""


class ConfigError(HistoflowError, ValueError):
    """A configuration value that cannot work; the message names the key (e.g. data.loader.batch_size)."""


class MissingInputError(HistoflowError, FileNotFoundError):
    """A file or folder that the configuration points at is not there."""


class NotWritableError(HistoflowError, PermissionError):
    """Output cannot be written where the configuration says."""


class DamagedFileError(HistoflowError, ValueError):
    """A file on disk is damaged (cut short, overwritten); the message names it and how to rebuild it."""


def message(error: HistoflowError) -> str:
    """The error's own message; a DataLoader worker's error is re-raised with the worker's traceback in front."""
    text = str(error)
    if "Original Traceback" in text:
        marker = f"{type(error).__module__}.{type(error).__qualname__}: "
        text = text.rsplit(marker, 1)[-1] if marker in text else text
    return text.rstrip()


def user_error(error: BaseException) -> HistoflowError | None:
    """The user's error inside an exception, if it is one: a HistoflowError, also where Hydra's instantiate wrapped
    it ("Error in call to target ..."), or an argument the target does not take (`+model.dropoutt=0.5`)."""
    seen = error
    while seen is not None and not isinstance(seen, HistoflowError):
        if isinstance(seen, TypeError) and "unexpected keyword argument" in str(seen):
            target = re.search(r"Error in call to target '([^']+)'", str(error))
            argument = re.search(r"unexpected keyword argument '([^']+)'", str(seen))
            return ConfigError(f"{target.group(1) if target else 'a configured object'} takes no argument "
                               f"{argument.group(1) if argument else ''!r}. Fix: correct the spelling of that key "
                               "(a +key override adds an argument that the object does not take)")
        seen = seen.__cause__  # `raise ... from`: a wrapper such as Hydra's; an error while handling another is a bug
    return seen


def report_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point's task function: a user's error (user_error) becomes its message on stderr and exit
    status 1, without Hydra's "Error executing job" and "Error in call to target" lines around it."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as e:
            found = user_error(e)
            if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            sys.stdout.flush()
            print(f"Error: {message(found)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return run
