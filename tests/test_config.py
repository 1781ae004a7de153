import pytest

from nmm.config import list_presets, load_config, parse_overrides
from nmm.errors import ConfigError


def test_presets_load():
    assert {"shapes-tiny", "shapes-quick", "shapes-demo"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.name == name


def test_overrides_are_typed_and_nested():
    cfg = load_config("shapes-tiny", ["train.max_steps=7", "model.qk_norm=false", "train.lr=1e-3"])
    assert cfg.train.max_steps == 7 and cfg.model.qk_norm is False and cfg.train.lr == pytest.approx(1e-3)
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config("shapes-tiny", ["train.max_stepz=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="model.d_model"):
        load_config("shapes-tiny", ["model.d_model=big"])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="shapes-tiny"):
        load_config("no-such-preset")


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("shapes-tiny", ["train.max_steps"])
