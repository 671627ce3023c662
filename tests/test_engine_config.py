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
