"""Shared fixtures: the real data under ../shared/data (or $HISTOFLOW_DATA), skipped when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Where the real test data lives: $HISTOFLOW_DATA, else ../shared/data beside the clone."""
    return Path(os.environ.get("HISTOFLOW_DATA", REPO.parent / "shared" / "data")).resolve()


def _require(sub: str) -> Path:
    path = shared_data_dir() / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent: set HISTOFLOW_DATA to the folder holding '{sub}/'")
    return path


@pytest.fixture(scope="session")
def lymphoma_dir() -> Path:
    return _require("lymphoma")


@pytest.fixture(scope="session")
def wsi_dir() -> Path:
    return _require("wsi")


@pytest.fixture(scope="session")
def kather_dir() -> Path:
    return _require("kather2016-sample")
