"""Every config error path names the field, the bad value and what is allowed."""

import dataclasses

import pytest

from jaxlm.config import RunConfig, default_config_dict, load_config_file, run_config_from_dict
from jaxlm.errors import ConfigError


def config_with(**sections):
    config = default_config_dict()
    for section, fields in sections.items():
        config[section].update(fields)
    return config


@pytest.mark.parametrize("sections, field", [
    ({"model": {"mixer": "lstm"}}, "model.mixer"),
    ({"model": {"layer_pattern": ("attention", "rnn")}}, "model.layer_pattern"),
    ({"model": {"num_heads": 4, "num_kv_heads": 3}}, "model.num_kv_heads"),
    ({"model": {"d_model": 30, "num_heads": 4}}, "model.num_heads"),
    ({"model": {"num_layers": 0}}, "model.num_layers"),
    ({"model": {"compute_dtype": "float16"}}, "model.compute_dtype"),
    ({"model": {"remat": "sometimes"}}, "model.remat"),
    ({"model": {"mamba2": {"state_dim": 0}}}, "model.mamba2.state_dim"),
    ({"model": {"path": {"impl": "fast"}}}, "model.path.impl"),
    ({"model": {"layer_pattern": ("attention",) * 3, "num_layers": 4, "scan_layers": True}}, "model.num_layers"),
    ({"model": {"max_seq_len": 64}, "data": {"seq_len": 128}}, "data.seq_len"),
    ({"model": {"vocab_size": 8}}, "model.vocab_size"),
    ({"data": {"source": "wikipedia"}}, "data.source"),
    ({"data": {"source": "text", "path": ""}}, "data.path"),
    ({"data": {"source": "text", "path": "no/such/folder"}}, "data.path"),
    ({"data": {"batch_size": 6}, "train": {"grad_accum_steps": 4}}, "data.batch_size"),
    ({"optimizer": {"learning_rate": -1.0}}, "optimizer.learning_rate"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"steps": 50}, "optimizer": {"warmup_steps": 50}}, "optimizer.warmup_steps"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
])
def test_bad_field_is_named(sections, field):
    with pytest.raises(ConfigError) as error:
        run_config_from_dict(config_with(**sections))
    assert error.value.field == field
    assert field in str(error.value)


def test_unknown_field_and_section_and_type():
    with pytest.raises(ConfigError, match="model.hidden_size"):
        run_config_from_dict({"model": {"hidden_size": 64}})
    with pytest.raises(ConfigError, match="model.mamba2.dstate"):
        run_config_from_dict({"model": {"mamba2": {"dstate": 16}}})
    with pytest.raises(ConfigError, match="trainer"):
        run_config_from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="model.d_model") as error:
        run_config_from_dict({"model": {"d_model": "wide"}})
    assert "integer" in str(error.value)


def test_defaults_round_trip_and_tuple_coercion():
    config = run_config_from_dict({"model": {"layer_pattern": ["attention", "attention"], "num_layers": 4}})
    assert config.model.layer_pattern == ("attention", "attention")
    assert run_config_from_dict(default_config_dict()) == RunConfig().validate()
    nested = run_config_from_dict({"model": {"gated_deltanet": {"key_dim": 32}}})
    assert nested.model.gated_deltanet.key_dim == 32 and nested.model.mamba2.state_dim == 64
    assert isinstance(run_config_from_dict({"optimizer": {"learning_rate": 1}}).optimizer.learning_rate, float)


def test_shipped_configs_are_valid():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    paths = sorted(glob.glob(os.path.join(root, "configs", "**", "*.py"), recursive=True))
    assert any(path.endswith(os.path.join("configs", "quickstart.py")) for path in paths)
    for path in paths:
        with open(path, encoding="utf-8") as file:
            if "\nRUN_CONFIG = False\n" in file.read():  # an experiment's own config (its script validates it)
                continue
        overrides = {"data.path": "README.md"} if "llama_125m" in path else {}
        config = load_config_file(path, overrides)
        assert dataclasses.is_dataclass(config)
