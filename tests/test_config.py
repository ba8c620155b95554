"""Config sections: read once, every key checked by its full name (data.loader's, the top level's of train and
predict), every default in one dataclass."""

from __future__ import annotations

import re
import typing
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from histoflow.common.config import read_section
from histoflow.common.errors import ConfigError
from histoflow.data.folds import SplitConfig
from histoflow.data.loader_config import LoaderConfig
from histoflow.data.patches import PatchConfig
from histoflow.data.prepare import DataConfig
from histoflow.data.stain import StainConfig
from histoflow.deployment.slide_map import SlideConfig
from histoflow.features.cohort_job import CohortRunConfig, CohortSlideConfig
from histoflow.slides.tiling import TILING_KEYS, TilingConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


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


@dataclass
class DataYaml(DataConfig):
    """A conf/data file: prepare's keys and the DataModule's loader section."""

    loader: LoaderConfig = field(default_factory=LoaderConfig)


def flat(cls: type, section: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Full key -> value of a section, walked into the dataclass's sub-sections (any other key kept as it is)."""
    hints, out = typing.get_type_hints(cls), {}
    for key, value in section.items():
        if is_dataclass(hints.get(key)):
            out.update(flat(hints[key], value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = value
    return out


# the values users see that differ from the dataclasses' defaults (the home of every default), and why
DELIBERATE = {
    "data.name": "names the lymphoma data set's prepared folders",
    "data.url": "the IICBU 2008 archive", "data.mirrors": "its mirror", "data.checksum": "its hash",
    "data.classes": "the tutorial's classes in its order (the dataclass: the folders found)",
    "data.patient_labels": "a lymphoma case has one subtype (the dataclass: tissue types may share a patient)",
    "data.cache_dir": "${paths.cache_dir}", "data.shards.dir": "${paths.data_dir}/prepared",
    "data.shards.workers": "2 processes, since the first commit; a Python caller's default is one per CPU",
    "slide.device": "${device}: predict.yaml's own", "slide.progress": "${progress}: predict.yaml's own",
}


@pytest.mark.parametrize("path, section, cls", [("data/lymphoma.yaml", "data", DataYaml),
                                                ("predict.yaml", "slide", SlideConfig)])
def test_the_yaml_shows_every_field_at_its_default_or_a_deliberate_override(path: str, section: str,
                                                                             cls: type) -> None:
    """The YAML repeats the dataclass for users (conf/data/lymphoma.yaml is the default data config; kather.yaml
    overrides it; predict's slide section composes conf/slide/default.yaml and adds its own keys): every field
    there, nothing else, and no value that silently disagrees with the dataclass."""
    if section == "data":
        yaml = OmegaConf.to_container(OmegaConf.load(CONF / path), resolve=False)
    else:  # composed with its defaults list, interpolations shown as written
        yaml = OmegaConf.to_container(compose_config(Path(path).stem, [])[section], resolve=False)
    yaml = {k: v for k, v in yaml.items() if k not in ("_target_", "bag_target")}
    shown, default = flat(cls, yaml, section), flat(cls, asdict(cls()), section)
    assert sorted(shown.keys() ^ default.keys()) == []
    differ = {k for k in default if shown[k] != default[k]}
    deliberate = {k for k in DELIBERATE if k.startswith(f"{section}.")}
    assert {k: (shown[k], default[k]) for k in differ ^ deliberate} == {}  # key: (YAML, dataclass)


def test_embed_train_and_predict_tile_a_slide_alike() -> None:
    """embed's slide, train's data.slide (data=slides) and predict's slide compose the one tiling of
    conf/slide/default.yaml: the same keys and values, read into the same TilingConfig; an override of one command
    changes that command alone."""
    embed = compose_config("embed", []).slide
    train = compose_config("train", ["data=slides", "encoder=mobilenet_v2_imagenet"]).data.slide
    predict = compose_config("predict", []).slide
    tilings = [{k: v for k, v in OmegaConf.to_container(c, resolve=False).items() if k in TILING_KEYS}
               for c in (embed, train, predict)]
    assert sorted(tilings[0]) == sorted(TILING_KEYS)
    assert tilings[0] == tilings[1] == tilings[2] == TilingConfig().tiling()
    read = [CohortSlideConfig.from_config(OmegaConf.to_container(embed, resolve=True)),
            CohortSlideConfig.from_config(OmegaConf.to_container(train, resolve=True))]
    assert read[0].tiling() == read[1].tiling() == SlideConfig().tiling()
    assert read[0].side == 224 and SlideConfig().tile_side(32) == 32  # null: the cohort's 224, a patch model's own
    moved = compose_config("predict", ["slide.mpp=0.25"]).slide
    assert moved.mpp == 0.25 and compose_config("embed", []).slide.mpp == 0.5


@pytest.mark.parametrize("key, value, fix", [("tile_size", 0, "slide.tile_size=224"),
                                             ("stride", 0, "slide.stride=null"),
                                             ("min_tissue", 1.5, "e.g. slide.min_tissue=0.5"),
                                             ("min_tissue", -0.1, "e.g. slide.min_tissue=0.5"),
                                             ("level", 1, "slide.mpp=null to read level 1")])
def test_a_tiling_out_of_range_is_refused_by_key_with_the_fix(key: str, value: Any, fix: str) -> None:
    for cls in (TilingConfig, CohortSlideConfig, SlideConfig):
        with pytest.raises(ConfigError, match=f"slide.{key}={value}.*Fix: {fix}"):
            cls.from_config({key: value}) if cls is not TilingConfig else cls(**{key: value})
    assert TilingConfig(mpp=None, level=1).level == 1 and TilingConfig(stride=1, min_tissue=0).stride == 1


@pytest.mark.parametrize("data", sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem != "slides"))
def test_every_data_config_reads_without_an_unknown_key(data: str) -> None:
    """Every key of conf/data/<data>.yaml is one of the dataclasses' (else read_section refuses it) and reaches them
    with its value."""
    cfg = OmegaConf.to_container(compose_config("prepare", [f"data={data}"]).data, resolve=True)
    given = {k: v for k, v in cfg.items() if k not in ("_target_", "bag_target", "loader")}  # bag_target: train's
    assert_values_read(given, asdict(DataConfig.from_config(cfg)), "data")
    assert_values_read(cfg["loader"], asdict(LoaderConfig.from_config(cfg["loader"])), "data.loader")


def assert_values_read(given: Mapping[str, Any], read: Mapping[str, Any], where: str) -> None:
    """Each value of `given` (nested sections too) is the one in `read`, a dataclass as asdict gives it."""
    for key, value in given.items():
        assert key in read, f"{where}.{key}: not read"
        if isinstance(value, dict) and isinstance(read[key], dict):
            assert_values_read(value, read[key], f"{where}.{key}")
        else:
            got = list(read[key]) if isinstance(read[key], tuple) else read[key]
            assert got == value, f"{where}.{key}: {value!r} in the config, {got!r} read"


def test_the_slide_bag_data_config_shows_the_cohort_sections_at_their_defaults() -> None:
    """data=slides (slide and patient bags from a slide table) composes the tiling (conf/slide) and repeats embed.yaml's
    slide keys of pace, its embed section and data.split: every key at the dataclass's default but val_fraction (0:
    small cohorts keep every patient in training, the last epoch is kept)."""
    composed = compose_config("train", ["data=slides", "encoder=mobilenet_v2_imagenet"]).data
    assert OmegaConf.to_container(composed.slide, resolve=True) == asdict(CohortSlideConfig())
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "slides.yaml"), resolve=False)
    assert yaml["features"] == {k: v for k, v in asdict(CohortRunConfig()).items() if k != "chunk"} | {
        "out": "${paths.data_dir}/slide_features"}
    split = {k: v for k, v in asdict(SplitConfig()).items() if k != "fractions"}
    assert yaml["split"] == split | {"val_fraction": 0.0}


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("batch_size", "abc"), ("eval_batch_size", -1),
                                       ("num_workers", -2), ("shuffle_buffer", 1.5), ("crop", 0)])
def test_loader_values_are_checked_up_front(key: str, value) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"data.loader.{key}={value!r}")):
        LoaderConfig.from_config({key: value})



def test_a_mistyped_top_level_key_is_refused(tmp_path: Path, leave_no_trace: None) -> None:
    """Issue 29: `+seeed=3` on train and `+aggregat=mean` on predict were ignored, exit 0."""
    from conftest import compose_config, compose_train

    from histoflow.common.config import refuse_unknown_top_keys
    from histoflow.deployment.deploy import predict
    from histoflow.training.run import train

    with pytest.raises(ConfigError, match="seeed: unknown top-level key"):
        train(compose_train(["+seeed=3"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="aggregat: unknown top-level key"):
        predict(compose_config("predict", ["ckpt_path=x", "+aggregat=mean"]))
    for experiment in ("janowczyk_lymphoma", "lymphoma_frozen_squeezenet", "kather_transfer"):  # every real key passes
        refuse_unknown_top_keys(compose_config("train", [f"experiment={experiment}", "trainer=gpu"]), "train")


def test_the_torchvision_models_are_one_config_and_a_name() -> None:
    """Each per-name torchvision file (resnet18.yaml ...) is two lines, `defaults: [torchvision]` and its name, and
    composes to conf/model/torchvision.yaml with that name: a key added to one torchvision model is added to all."""
    base = OmegaConf.to_container(compose_config("train", ["model=torchvision"]).model, resolve=False)
    names = [p.stem for p in sorted((CONF / "model").glob("*.yaml"))
             if OmegaConf.load(p).get("defaults") == ["torchvision"]]
    assert len(names) >= 9, names
    for name in names:
        text = (CONF / "model" / f"{name}.yaml").read_text().strip().splitlines()
        assert len(text) == 2 and text[1] == f"name: {name}", f"conf/model/{name}.yaml: {text}"
        composed = OmegaConf.to_container(compose_config("train", [f"model={name}"]).model, resolve=False)
        assert composed == {**base, "name": name}


def test_the_imagenet_encoders_build_on_the_encoder_base() -> None:
    """squeezenet1_1_imagenet and mobilenet_v2_imagenet extend encoder/torchvision_imagenet: ImageNet's mean and std
    are written once."""
    base = compose_config("train", ["encoder=torchvision_imagenet", "model=linear_head"]).encoder
    for name in ("squeezenet1_1_imagenet", "mobilenet_v2_imagenet"):
        assert OmegaConf.load(CONF / "encoder" / f"{name}.yaml").defaults[0] == "torchvision_imagenet"
        encoder = compose_config("train", [f"encoder={name}", "model=linear_head"]).encoder
        assert encoder.preprocess.mean == base.preprocess.mean and encoder._target_ == base._target_
