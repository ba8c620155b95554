"""Config sections: read once, every key checked by its full name, every default in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from histoflow.config import read_section
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
