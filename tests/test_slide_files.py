"""The slides of a folder (issue 37, item 12): every format a backend opens (MIRAX, Hamamatsu VMS, DICOM among them),
a DICOM folder as one slide, and the files skipped listed, never in silence."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from histoflow.deployment import predict as predict_module


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def test_a_folder_gives_every_slide_format_and_lists_what_it_skipped(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    touch(tmp_path, "a.svs", "b.mrxs", "b/Slidedat.ini", "b/Data0000.dat", "c.vms", "c.jpg", "d/1.dcm", "d/2.dcm",
          "e.ndpi", "notes.txt", "table.xlsx")
    with caplog.at_level(logging.WARNING):
        found = predict_module.files_matching(str(tmp_path), key="slides")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.svs", "b.mrxs", "c.vms", "d/1.dcm", "e.ndpi"]
    assert "2 file(s) skipped, not slide files histoflow reads (1 .txt, 1 .xlsx): notes.txt, table.xlsx" in caplog.text
    assert "Slidedat" not in caplog.text and "c.jpg" not in caplog.text  # parts of the MIRAX and VMS slides
