"""Config sections read into dataclasses: one place that refuses unknown keys and values of the wrong type.

Hydra answers a mistyped key of a YAML section with "use +key=value to add it"; a key added that way is read by
nothing. Every section histoflow owns is read through `read_section`, which names such a key in full (e.g.
`data.split.kk`) with the keys the section knows; a field typed as a dataclass is read as a sub-section.

The dataclasses are the one home of every default and type. The YAML files repeat the values for users to see
and override, and tests/test_config.py holds them to the dataclasses (every field there, every value equal to
its default or a listed deliberate override). They are not registered as Hydra structured configs: OmegaConf
2.3 takes no unions (`num_workers: int | "auto"`, `flips: bool | "horizontal"`), and sections also arrive as
plain mappings (a checkpoint's config, Python callers), which the one read checks alike.
"""

from __future__ import annotations

import types
import typing
import warnings
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

from omegaconf import OmegaConf

from histoflow.common.errors import ConfigError

T = TypeVar("T")


def to_builtin(value: Any) -> Any:
    """A Hydra/OmegaConf node as plain dicts and lists (interpolations resolved); anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_keys(cfg: Mapping[str, Any], known: Iterable[str], section: str) -> None:
    """Refuse keys of `cfg` that nothing reads, naming them as `section.key`."""
    known = set(known)
    unknown = sorted(set(cfg) - known)
    if unknown:
        names = ", ".join(f"{section}.{k}" for k in unknown)
        raise ConfigError(f"{names}: unknown key(s); {section} has {', '.join(sorted(known))}. Fix: correct the "
                          "spelling (a +key override adds a key that nothing reads)")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain config value fits a dataclass field's annotation (ints pass for floats, not bools)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if origin is dict:
        return isinstance(value, Mapping)
    return isinstance(value, origin or hint)


def read_section(cls: type[T], cfg: Mapping[str, Any] | None, section: str, ignore: Iterable[str] = ()) -> T:
    """The dataclass `cls` from a config section: unknown keys and values of the wrong type are refused by their
    full name (`section.key=value`), fields typed as a dataclass read as sub-sections; keys in `ignore` belong to
    the caller."""
    cfg = dict(cfg or {})
    check_keys(cfg, {f.name for f in fields(cls)} | set(ignore), section)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name not in cfg:
            continue
        key, value, hint = f"{section}.{f.name}", cfg[f.name], hints[f.name]
        if is_dataclass(hint) and (value is None or isinstance(value, Mapping)):
            value = read_section(hint, value, key)
        elif not _fits(value, hint):
            expected = ("a section" if is_dataclass(hint) else hint.__name__ if isinstance(hint, type)
                        else str(hint).replace("typing.", ""))
            raise ConfigError(f"{key}={value!r}: expected {expected}")
        values[f.name] = value
    missing = [f.name for f in fields(cls) if f.name not in values and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{', '.join(f'{section}.{m}' for m in missing)}: required")
    return cls(**values)


def at_least(value: Any, low: int, key: str, optional: bool = False) -> None:
    """Refuse a number below `low` (None passes when optional), naming the key."""
    if value is None and optional:
        return
    if value is None or value < low:
        raise ConfigError(f"{key}={value!r}: must be at least {low}" + (" (or null)" if optional else ""))


PACKAGE = Path(__file__).resolve().parents[1]
CONF_DIR = PACKAGE / "conf"  # the configs ship inside the package (a wheel has them); the checkout's conf/ links here
# The configs also search the user's own config folder ($HISTOFLOW_CONF, default ./conf), which most folders lack:
# Hydra's warning about that is no news
warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=.* is not available")
# a checkout's root, where conf/'s relative defaults (../shared/weights) start from; None when installed from a wheel
CHECKOUT: Path | None = PACKAGE.parents[1] if (PACKAGE.parents[1] / "pyproject.toml").is_file() else None


def local_file(value: Any) -> Any:
    """A relative path to a file as an absolute one, found from the working folder, else from the checkout (so
    conf/'s `../shared/weights/...` works from any folder); names, URLs and files not found stay as given. A path
    kept in a checkpoint must not depend on the folder a run was started from."""
    if not isinstance(value, str) or "://" in value or not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    for base in filter(None, (Path.cwd(), CHECKOUT)):
        if (base / path).is_file():
            return str((base / path).resolve())
    return value


def localize_weights(cfg: Any, sections: Iterable[str] = ("model", "encoder")) -> None:
    """Each section's `weights` through local_file, in place (a run's config, before it is built or saved)."""
    for section in sections:
        node = cfg.get(section) if hasattr(cfg, "get") else None
        if node is not None and hasattr(node, "get") and node.get("weights") is not None:
            node["weights"] = local_file(str(node["weights"]))


def refuse_unknown_top_keys(cfg: Mapping[str, Any], config_name: str) -> None:
    """Refuse a top-level key that conf/<config_name>.yaml neither holds nor gets from its defaults list's groups:
    `+seeed=3` or `+aggregat=mean`, which Hydra adds and nothing reads."""
    yaml = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    groups = {str(next(iter(entry)) if isinstance(entry, Mapping) else entry).split("@")[0]
              for entry in yaml.get("defaults", [])}
    unknown = sorted(set(cfg) - (set(yaml) | groups | {"hydra"}))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: unknown top-level key(s); {config_name}.yaml has "
                          f"{', '.join(sorted((set(yaml) | groups) - {'defaults', '_self_'}))}. Fix: correct the "
                          "spelling (a +key override adds a key that nothing reads)")
