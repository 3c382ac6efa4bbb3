"""Property: whatever value any config key gets (wrong types, out of range, garbage strings, nested junk), the
outcome is a valid Config or a ConfigError naming that key; and every path key is checked against the machine
(`check_training_paths`) before a model is built."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r2d2ds.config import Config, ConfigError, load_config
from r2d2ds.preflight import check_training_paths

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
KEYS = [(s, f.name) for s, cls in typing.get_type_hints(Config).items() for f in dataclasses.fields(cls)]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80)
           | st.sampled_from([0, -1, 1, 2, 2**31, 2**63, -(2**63) - 1, 0.0, -0.5, 0.5, 1.0, 1.5, 1e-9, 1e308])
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["", " ", "\0", "auto", "config", "null", "3e-4", "1e999",
                                                     "JPEG", "random", "ds_config", "torch", "../x", "~/nope"]))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4), max_leaves=12)


def _names_key(err: ConfigError, dotted: str) -> bool:
    return re.search(rf"'{re.escape(dotted)}(\.[^']*)?'", str(err)) is not None


def _assert_typed(cfg: Config) -> None:
    for section, cls in typing.get_type_hints(Config).items():
        obj = getattr(cfg, section)
        for name, hint in typing.get_type_hints(cls).items():
            val = getattr(obj, name)
            base = typing.get_origin(hint) or hint
            if base in (typing.Union, type(int | None)):
                assert val is None or isinstance(val, str), (section, name, val)
            elif base is float:
                assert isinstance(val, float) and math.isfinite(val), (section, name, val)
            elif base is int:
                assert isinstance(val, int) and not isinstance(val, bool), (section, name, val)
            else:
                assert isinstance(val, base), (section, name, val)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cfg") / "config.yaml"


@pytest.mark.parametrize("section,key", KEYS, ids=[f"{s}.{k}" for s, k in KEYS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=junk)
def test_any_value_is_a_valid_config_or_an_error_naming_the_key(section, key, value, saved):
    try:
        cfg = load_config(None, {section: {key: value}})
    except ConfigError as err:
        assert _names_key(err, f"{section}.{key}"), str(err)
        return
    _assert_typed(cfg)
    cfg.save(saved)  # what is accepted is saved with the run and must read back as the same config
    assert load_config(saved) == cfg


@pytest.mark.parametrize("section,key", KEYS, ids=[f"{s}.{k}" for s, k in KEYS])
@settings(max_examples=15, deadline=None)
@given(text=st.text(max_size=16) | st.sampled_from(["{", "[1, 2", "a: b", "!!python/object:os.system", "*x",
                                                     "- 1\n- 2", "{a: [1, {b: 2}]}", "1e999", ".nan", "~"]))
def test_any_command_line_text_is_a_valid_config_or_an_error_naming_the_key(section, key, text):
    try:
        load_config(None, [f"--{section}.{key}={text}"])
    except ConfigError as err:
        assert _names_key(err, f"{section}.{key}"), str(err)


@pytest.mark.parametrize("section", sorted(SECTIONS))
@given(value=junk.filter(lambda v: not isinstance(v, dict)))
@settings(max_examples=10, deadline=None)
def test_a_section_that_is_not_a_mapping_is_named(section, value):
    with pytest.raises(ConfigError, match=f"'{section}'"):
        load_config(None, {section: value})


def test_cross_key_errors_name_every_key_involved():
    with pytest.raises(ConfigError, match=r"'train.min_lr', 'train.lr'"):
        load_config(None, ["--train.lr=1e-7"])
    with pytest.raises(ConfigError, match=r"'model.temperature_min', 'model.temperature_init'"):
        load_config(None, ["--model.temperature_max=0.01"])


# ------------------------------------------------------------------------------------------ paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from r2d2ds.data.prepare import prepare_synthetic

    out = tmp_path_factory.mktemp("paths") / "data"
    prepare_synthetic(out, train=4, val=2, test=0, image_size=16, seed=0, shard_size=4)
    return out


def _base(dataset: Path) -> dict:
    return {"data": {"train": str(dataset), "val": str(dataset)},
            "train": {"ds_config": str(ROOT / "ds_configs" / "zero2.json")},
            "model": {"text_model": "config"}}


def test_valid_paths_pass_and_names_are_accepted(dataset):
    cfg = load_config(None, _base(dataset))
    assert len(check_training_paths(cfg)) > 5  # the tokenizer it loaded
    over = _base(dataset)
    over["model"].update(text_model="bert-base-chinese", image_model="vit_base_patch16_224")  # names, not paths
    check_training_paths(load_config(None, over))


@pytest.mark.parametrize("section,key,value", [
    ("data", "train", ""), ("data", "train", "nothere/"), ("data", "train", "nothere-{0..3}.tar"),
    ("data", "val", "nothere"), ("data", "val_split", "test"), ("data", "train_split", "nosplit"),
    ("data", "tokenizer", "nothere/vocab.txt"), ("data", "tokenizer", "not-a-cached-hub-name"),
    ("train", "ds_config", "nothere.json"), ("train", "ds_config", "README.md"),
    ("model", "image_checkpoint", "nothere.safetensors"), ("model", "text_model", "./nothere"),
    ("model", "image_model", "not_a_timm_model"),
])
def test_each_missing_path_is_named(dataset, section, key, value):
    over = _base(dataset)
    if (section, key) == ("train", "ds_config") and value == "README.md":
        value = str(ROOT / value)
    over.setdefault(section, {})[key] = value
    cfg = load_config(None, over)
    named = {"train_split": "data.train", "val_split": "data.val"}.get(key, f"{section}.{key}")
    with pytest.raises(ConfigError, match=re.escape(f"'{named}'")):
        check_training_paths(cfg)


@pytest.mark.parametrize("key", ["data.train", "data.val", "data.tokenizer", "train.ds_config",
                                 "model.image_checkpoint", "model.text_model", "model.image_model"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=24).filter(lambda t: "\0" not in t))
def test_any_path_text_passes_or_is_named(dataset, key, text):
    section, name = key.split(".")
    over = _base(dataset)
    over[section][name] = text
    try:
        check_training_paths(load_config(None, over))
    except ConfigError as err:
        assert _names_key(err, key), str(err)


def test_train_py_stops_before_building_anything(dataset, capsys):
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    assert train.main([f"--data.train={dataset}/missing", "--model.text_model=config"]) == 2
    assert "'data.train'" in capsys.readouterr().err
