"""Qwen3 config from HF config.json; the embedded Qwen3-0.6B default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
import torch
from engine_helpers import small_config

import engine
from engine.config import DEFAULT_CONFIG_PATH, Qwen3Config, UnsupportedConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_qwen3_0_6b():
    c = engine.default_config()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (1024, 28, 16)
    assert (c.num_key_value_heads, c.head_dim, c.intermediate_size) == (8, 128, 3072)
    assert c.vocab_size == 151936 and c.tie_word_embeddings
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6
    assert c.qkv_size == (16 + 2 * 8) * 128


def test_default_json_ships_with_the_package():
    raw = json.loads(DEFAULT_CONFIG_PATH.read_text())
    assert raw["architectures"] == ["Qwen3ForCausalLM"] and raw["model_type"] == "qwen3"
    assert DEFAULT_CONFIG_PATH.parent == ROOT / "engine"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "*.json" in package_data["package-data"]["engine"]


def test_reads_transformers_written_config(tmp_path):
    """The format transformers 5 writes (rope_parameters) and the older one (rope_theta)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3Config(
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=160,
        vocab_size=300,
        rope_theta=12345.0,
        tie_word_embeddings=False,
    )
    hf.save_pretrained(tmp_path)
    c = Qwen3Config.from_hf_json(tmp_path)  # a folder reads its config.json
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (96, 3, 6)
    assert (c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 32, 160)
    assert c.vocab_size == 300 and not c.tie_word_embeddings and c.rope_theta == 12345.0
    old_style = {**c.to_hf_dict(), "rope_theta": 777.0}
    assert Qwen3Config.from_hf_json(old_style).rope_theta == 777.0
    assert Qwen3Config.from_hf_json(c.to_hf_dict()).replace(source="x") == c.replace(source="x")


@pytest.mark.parametrize("layers", [1, 3, 24])
def test_layer_count_comes_from_the_config(layers):
    model = engine.build(small_config(num_hidden_layers=layers), dtype=torch.float32, device="cpu")
    assert len(model.model.layers) == layers


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "is not Qwen3"),
        ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "is not Qwen3"),
        ({"architectures": ["Qwen2ForCausalLM"]}, "is not Qwen3"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
    ],
)
def test_unsupported_configs_are_rejected(change, message):
    raw = {**json.loads(DEFAULT_CONFIG_PATH.read_text()), **change}
    with pytest.raises(UnsupportedConfigError, match=message):
        Qwen3Config.from_hf_json(raw)


def test_invalid_configs_name_the_field(tmp_path):
    raw = json.loads(DEFAULT_CONFIG_PATH.read_text())
    with pytest.raises(ValueError, match="num_attention_heads"):
        Qwen3Config.from_hf_json({**raw, "num_key_value_heads": 5})
    with pytest.raises(ValueError, match="missing field 'vocab_size'"):
        Qwen3Config.from_hf_json({k: v for k, v in raw.items() if k != "vocab_size"})
    with pytest.raises(FileNotFoundError, match="config file not found"):
        Qwen3Config.from_hf_json(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Qwen3Config.from_hf_json(tmp_path)


# --- User input errors: each names the field and starts with the source ---------------------

INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def _default_raw() -> dict:
    return json.loads(DEFAULT_CONFIG_PATH.read_text())


def _error(raw) -> ValueError:
    with pytest.raises(ValueError) as excinfo:
        Qwen3Config.from_hf_json(raw)
    return excinfo.value


@pytest.mark.parametrize("value", [None, 0], ids=["null", "zero"])
def test_kv_heads_null_or_zero_is_an_error_not_the_head_count(value):
    err = _error({**_default_raw(), "num_key_value_heads": value})
    assert str(err).startswith("<dict>: num_key_value_heads must be a positive integer"), err


def test_absent_optional_integers_take_transformers_defaults():
    raw = _default_raw()
    for name in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        del raw[name]
    c = Qwen3Config.from_hf_json(raw)
    assert c.num_key_value_heads == c.num_attention_heads == 16
    assert c.head_dim == 1024 // 16 and c.max_position_embeddings == 32768


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [None, 0, -8, 8.0, True, "8"])
def test_present_integer_fields_must_be_positive_integers(field, value):
    err = _error({**_default_raw(), field: value})
    assert not isinstance(err, UnsupportedConfigError)
    assert str(err).startswith(f"<dict>: {field} must be a positive integer, got "), err


@pytest.mark.parametrize("field", ["tie_word_embeddings", "attention_bias", "use_sliding_window"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_booleans_must_be_json_booleans(field, value):
    err = _error({**_default_raw(), field: value})
    # not UnsupportedConfigError: a truthy string must not read as true
    assert not isinstance(err, UnsupportedConfigError)
    assert str(err).startswith(f"<dict>: {field} must be a JSON boolean (true or false)"), err


def test_tie_word_embeddings_false_string_is_not_true(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**_default_raw(), "tie_word_embeddings": "false"}))
    with pytest.raises(ValueError, match=r'tie_word_embeddings .*got "false"') as excinfo:
        Qwen3Config.from_hf_json(path)
    assert str(excinfo.value).startswith(f"{path}: ")
    untied = Qwen3Config.from_hf_json({**_default_raw(), "tie_word_embeddings": False})
    assert untied.tie_word_embeddings is False


@pytest.mark.parametrize(
    "field", ["rope_theta", "rms_norm_eps", "rope_parameters.rope_theta"], ids=str
)
@pytest.mark.parametrize(
    "value", [0, -1.0, float("inf"), float("nan"), None, "1e6", True], ids=repr
)
def test_rope_theta_and_eps_must_be_finite_positive_numbers(field, value):
    raw = _default_raw()
    if field == "rope_parameters.rope_theta":  # the transformers 5 spelling
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": value}
    else:
        raw[field] = value
    err = _error(raw)
    assert str(err).startswith(f"<dict>: {field} must be a finite number > 0, got "), err


def test_integer_rope_theta_is_a_number():
    assert Qwen3Config.from_hf_json({**_default_raw(), "rope_theta": 500000}).rope_theta == 5e5


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"qwen3"', "3"])
def test_config_file_must_hold_a_json_object(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="must hold a JSON object") as excinfo:
        Qwen3Config.from_hf_json(path)
    assert str(excinfo.value).startswith(f"{path}: ")


def test_rope_parameters_must_be_an_object():
    err = _error({**_default_raw(), "rope_parameters": [1000000]})
    assert str(err).startswith("<dict>: rope_parameters must be a JSON object"), err


def test_missing_file_message_starts_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        Qwen3Config.from_hf_json(tmp_path / "nope.json")
    assert str(excinfo.value).startswith(f"{tmp_path / 'nope.json'}: config file not found")


def test_replace_checks_the_new_values():
    """A config built in Python is held to the same rules as one read from JSON."""
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 0"):
        engine.default_config().replace(rope_theta=0.0)
    with pytest.raises(ValueError, match="tie_word_embeddings must be a JSON boolean"):
        engine.default_config().replace(tie_word_embeddings="false")


# Parameter counts the Qwen3 model cards publish (billions: total, non-embedding).
PUBLISHED_PARAMETERS = {
    "0.6b": (0.6, 0.44),
    "1.7b": (1.7, 1.4),
    "4b": (4.0, 3.6),
    "8b": (8.2, 6.95),
}


@pytest.mark.parametrize("size", sorted(PUBLISHED_PARAMETERS))
def test_each_size_has_the_published_parameter_count(size):
    """--size decodes the real architecture: layers, widths and an untied LM head all count
    (counted on the meta device: no memory)."""
    from engine.config import qwen3_config
    from engine.qwen3 import Qwen3ForCausalLM, on_meta

    with on_meta(torch.bfloat16):
        model = Qwen3ForCausalLM(qwen3_config(size))
    total = sum(p.numel() for p in model.parameters()) / 1e9
    embedding = model.config.vocab_size * model.config.hidden_size / 1e9
    lm_head = 0 if model.config.tie_word_embeddings else embedding
    want_total, want_body = PUBLISHED_PARAMETERS[size]
    assert total - embedding - lm_head == pytest.approx(want_body, rel=0.03)
    assert total == pytest.approx(want_total, rel=0.05)
