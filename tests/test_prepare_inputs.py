"""What `prepare` reads and refuses before any work: a mistyped root (never a download), linked folders, mistyped
keys by their full name, one class, values that leave no folder behind, the fix for an empty class folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import CLASSES, config, make_images

from histoflow.common.errors import ConfigError, HistoflowError, MissingInputError
from histoflow.data.prepare import prepare_dataset
from histoflow.data.problems import FIXES
from histoflow.data.sources import SourceConfig, list_images


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_mistyped_root_is_an_error_never_a_download(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "lymphoma-typo"
    if kind == "file":
        root.write_text("not a folder")
    data = config(root, tmp_path / "prepared", url="http://127.0.0.1:9/never-asked.tar.gz",
                  cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MissingInputError, match=f"data.root={root}") as error:
        prepare_dataset(data, quiet=True)
    assert "predict.py: +data.root=" in str(error.value)  # issue 29: predict's data section starts empty
    assert not (tmp_path / "cache").exists()



def test_linked_folders_inside_a_class_are_followed_once(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=2)
    extra = make_images(tmp_path / "elsewhere", per_class=3, seed=1)
    (root / "CLL" / "more").symlink_to(extra / "CLL", target_is_directory=True)
    (root / "CLL" / "loop").symlink_to(root / "CLL", target_is_directory=True)  # must not recurse forever
    records, problems = list_images(SourceConfig(classes=CLASSES), root)
    cll = sorted(r.path for r in records if r.label == "CLL")
    assert cll == ["CLL/CLL-0.png", "CLL/CLL-1.png", "CLL/more/CLL-0.png", "CLL/more/CLL-1.png",
                   "CLL/more/CLL-2.png"]
    assert problems == []



@pytest.mark.parametrize("over,key", [({"split": {"kk": 3}}, "data.split.kk"),
                                      ({"patches": {"strid": 16}}, "data.patches.strid"),
                                      ({"shards": {"sample_per_shard": 9}}, "data.shards.sample_per_shard"),
                                      ({"lables": "csv"}, "data.lables")])
def test_unknown_keys_are_refused_with_their_full_name(tmp_path: Path, over: dict, key: str) -> None:
    root = make_images(tmp_path / "images", per_class=2)
    with pytest.raises(ConfigError, match=re.escape(key)):
        prepare_dataset(config(root, tmp_path / "prepared", **over), quiet=True)



def test_one_class_is_an_error_at_prepare(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=3)
    for c in CLASSES[1:]:
        for p in (root / c).iterdir():
            p.unlink()
        (root / c).rmdir()
    with pytest.raises(ConfigError, match="one class"):
        prepare_dataset(config(root, tmp_path / "prepared", classes=None), quiet=True)



@pytest.mark.parametrize("over, message", [
    ({"patches": {"stride": 0}}, "data.patches.stride=0: must be at least 1"),
    ({"patches": {"stride": -4}}, "data.patches.stride=-4: must be at least 1"),
    ({"patches": {"size": 0}}, "data.patches.size=0: must be at least 1"),
    ({"patches": {"rotations": [45]}}, "only multiples of 90 degrees"),
    ({"split": {"k": 1}}, "data.split.k=1: must be at least 2"),
    ({"split": {"val_fraction": 1.0}}, "data.split.val_fraction=1.0"),
    ({"split": {"kind": "fractions", "fractions": {"train": 0.5, "test": 0.6}}}, "adding up to 1"),
    ({"patches": {"size": 5000}}, "too-small"),    # known only once the images are read
    ({"split": {"k": 20}}, "data.split.k"),        # more folds than patients
])
def test_refused_values_leave_no_folder(tmp_path: Path, over: dict, message: str) -> None:
    """Issue 29.6: stride 0 or -4, size 0 and k=1 ended in tracebacks with a half-written prepared folder, and values
    refused cleanly still left empty folders."""
    root = make_images(tmp_path / "images", per_class=4)
    with pytest.raises(HistoflowError, match=re.escape(message)):
        prepare_dataset(config(root, tmp_path / "prepared", **over), quiet=True)
    prepared = tmp_path / "prepared"
    assert not prepared.exists() or not [p.name for p in prepared.iterdir() if not p.name.startswith(".")]



def test_the_empty_class_folder_fix_works(tmp_path: Path) -> None:
    """Issue 29: an empty class folder suggested data.classes=[...] without it, which still failed on that folder."""
    root = make_images(tmp_path / "images", per_class=4)
    (root / "EMPTY").mkdir()
    records, problems = list_images(SourceConfig(), root)
    assert [p.kind for p in problems] == ["empty-class"] and "data.classes" in FIXES["empty-class"]
    records, problems = list_images(SourceConfig(classes=CLASSES), root)
    assert not problems and {r.label for r in records} == set(CLASSES)
