"""Protocols: groups (patients) from a table with labels from the folders, a protocol switching folds by one
override, leave one case out."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config, make_images, write_cases
from omegaconf import OmegaConf
from PIL import Image

from histoflow.data.folds import SplitConfig, assign_folds
from histoflow.data.prepare import prepare_dataset
from histoflow.data.problems import BadInputError
from histoflow.data.sources import SourceConfig, list_images


def make_cases(root: Path, cases_per_class: int = 4, images_per_case: int = 3) -> Path:
    """Class folders of small PNGs, and root/cases.csv giving each image's case (image,label,group)."""
    make_images(root, per_class=cases_per_class * images_per_case, size=(72, 40), digits=4)
    return write_cases(root, per_case=images_per_case, group="{label}-case{case}")


def test_groups_from_a_table_with_labels_from_the_folders(tmp_path: Path) -> None:
    root = make_cases(tmp_path / "images")
    records, problems = list_images(SourceConfig(labels="folder", groups="cases.csv"), root)
    assert not problems and len(records) == 36
    assert {r.path: r.group for r in records}["FL/FL-0004.png"] == "FL-case1"
    assert len({r.group for r in records}) == 12


def test_a_label_the_table_disagrees_with_is_refused_naming_the_file(tmp_path: Path) -> None:
    root = make_cases(tmp_path / "images")
    table = root / "cases.csv"
    text = table.read_text().replace("FL/FL-0004.png,FL,", "FL/FL-0004.png,MCL,")
    table.write_text(text)
    _, problems = list_images(SourceConfig(groups="cases.csv"), root)
    assert [(Path(p.path).name, p.kind) for p in problems] == [("FL-0004.png", "conflicting-labels")]
    assert str(table) in problems[0].detail and "'MCL'" in problems[0].detail
    data = {"name": "t", "root": str(root), "groups": "cases.csv", "split": {"k": 3},
            "shards": {"dir": str(tmp_path / "prepared"), "workers": 1}}
    with pytest.raises(BadInputError, match="FL-0004.png"):
        prepare_dataset(data, quiet=True)


def test_an_image_missing_from_the_table_and_a_missing_table_are_named(tmp_path: Path) -> None:
    root = make_cases(tmp_path / "images")
    Image.new("RGB", (72, 40)).save(root / "CLL" / "CLL-9999.png")
    _, problems = list_images(SourceConfig(groups="cases.csv"), root)
    assert [(Path(p.path).name, p.kind) for p in problems] == [("CLL-9999.png", "no-group")]
    with pytest.raises(FileNotFoundError, match=r"data.groups=nowhere.csv: no table at .*nowhere.csv"):
        list_images(SourceConfig(groups="nowhere.csv"), root)


def test_leave_one_group_out_makes_one_fold_per_group() -> None:
    labels = ["A"] * 6 + ["B"] * 4
    groups = ["a1", "a1", "a2", "a3", "a3", "a3", "b1", "b2", "b2", "b3"]
    folds, val = assign_folds(labels, groups, SplitConfig(kind="leave_one_group_out", val_fraction=0.1))
    assert len(set(folds)) == 6 and not any(val)
    for g in set(groups):
        assert len({f for f, h in zip(folds, groups) if h == g}) == 1  # a group is one fold
    rows = [{"group": g, "fold": f} for g, f in zip(groups, folds)]
    assert SplitConfig(kind="leave_one_group_out").test_folds(rows) == [str(i) for i in range(1, 7)]


def _compose(overrides: list[str]):
    return compose_config("train", overrides)


def test_a_protocol_switches_the_folds_and_nothing_else(tmp_path: Path) -> None:
    root = make_cases(tmp_path / "images", cases_per_class=5)
    base = ["experiment=lymphoma_robust", f"data.root={root}", f"paths.data_dir={tmp_path / 'work'}",
            "data.shards.workers=1"]
    configs = {p: _compose([*base, f"protocol={p}"]) for p in ("cases", "images", "loco", "blocks")}
    default = _compose(base)
    assert default.data.groups == "cases.csv"  # the lymphoma experiments use case folds by default
    plain = {p: OmegaConf.to_container(c, resolve=False) for p, c in configs.items()}
    for cfg in plain.values():  # the protocol touches the grouping and the kind of split only
        for key in ("groups", "group_regex", "group_block"):
            cfg["data"].pop(key)
        cfg["data"]["split"].pop("kind")
    assert all(cfg == plain["cases"] for cfg in plain.values())

    manifests = {}
    for p in ("cases", "images", "loco"):
        data = OmegaConf.to_container(configs[p].data, resolve=True)
        data["split"]["val_fraction"] = 0
        manifests[p] = prepare_dataset(data, quiet=True).manifest()
    by_case = {}
    for r in manifests["cases"]:
        by_case.setdefault(r["group"], set()).add(r["fold"])
    assert len(by_case) == 15 and all(len(f) == 1 for f in by_case.values())  # no case on two sides
    per_image = {r["group"] for r in manifests["images"]}
    assert len(per_image) == 45  # every image its own group: cases split across folds
    assert len({r["fold"] for r in manifests["loco"]}) == 15
