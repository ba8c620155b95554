"""Config sections: read once, every key checked by its full name, every default in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from histoflow.config import read_section
from histoflow.data.patches import PatchConfig
from histoflow.data.prepare import DataConfig
from histoflow.data.stain import StainConfig
from histoflow.errors import ConfigError


@dataclass
class Inner:
    size: int = 3


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_a_dataclass_field_is_read_as_a_sub_section_named_in_full() -> None:
    assert read_section(Outer, {"inner": {"size": 5}}, "top") == Outer(inner=Inner(5))
    assert read_section(Outer, {"inner": None}, "top") == Outer()
    for bad, message in (({"inner": {"sise": 5}}, "top.inner.sise: unknown key"),
                         ({"inner": {"size": "5"}}, "top.inner.size='5': expected int"),
                         ({"inner": 5}, "top.inner=5: expected a section")):
        with pytest.raises(ConfigError, match=message):
            read_section(Outer, bad, "top")


def test_the_stain_section_refuses_wrong_types_and_unknown_keys_by_name() -> None:
    assert StainConfig.from_config({"method": "reinhard", "reference": "a.png"}) == StainConfig("reinhard", "a.png")
    for bad, message in (({"reference": 3}, "data.stain.reference=3: expected"),
                         ({"methd": "macenko"}, "data.stain.methd: unknown key"),
                         ({"method": "vahadane", "reference": "a.png"}, "data.stain.method='vahadane'"),
                         ({"method": "macenko"}, "needs data.stain.reference")):
        with pytest.raises(ConfigError, match=message):
            StainConfig.from_config(bad)


def test_the_data_config_is_read_once_every_key_by_its_full_name() -> None:
    """prepare's one read of `data`: the source's keys at the top, a section per step; loader is the DataModule's."""
    cfg = DataConfig.from_config({"_target_": "x", "loader": {"crop": 9}, "root": "r", "split": {"k": 3}})
    assert (cfg.root, cfg.split.k, cfg.patches, cfg.name) == ("r", 3, PatchConfig(), DataConfig.name)
    for bad, message in (({"rooot": "r"}, "data.rooot: unknown key"),
                         ({"split": {"kk": 3}}, "data.split.kk: unknown key"),
                         ({"shards": {"workers": "2"}}, "data.shards.workers='2': expected"),
                         ({"patches": 36}, "data.patches=36: expected a section"),
                         ({"patches": {"rotations": [45]}}, "data.patches.rotations"),
                         ({"on_bad_image": "warn"}, "data.on_bad_image='warn': expected error or skip"),
                         ({"stain": {"method": "macenko"}}, "needs data.stain.reference")):
        with pytest.raises(ConfigError, match=message):
            DataConfig.from_config(bad)
