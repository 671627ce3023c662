"""Qwen3 architecture from a Hugging Face ``config.json``; the shipped default is Qwen3-0.6B.

Only what the engine implements is accepted: a config for another architecture, or a Qwen3
feature this engine does not implement (attention bias, sliding window, RoPE scaling), gets
an error that says which field, instead of a model that silently computes something else.

Errors: UnsupportedConfigError (a ValueError) for what the engine does not implement, ValueError
for a bad value, FileNotFoundError for a missing file; every message starts with the source
(the file path, or "<dict>"). A field that is absent may take a default; a field that is present
must be valid (a null, a 0 or a string "false" is an error, never a default).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

DEFAULT_CONFIG_PATH = Path(__file__).with_name("qwen3_0_6b.json")
# SMALL below as an HF config.json, for `python -m engine --config` (a test keeps them equal).
SMALL_CONFIG_PATH = Path(__file__).with_name("small_config.json")
QWEN3_ARCHITECTURE = "Qwen3ForCausalLM"
QWEN3_MODEL_TYPE = "qwen3"

MAX_HIDDEN_SIZE = 1 << 16
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class UnsupportedConfigError(ValueError):
    """The config describes a model this engine does not implement."""


_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "use_sliding_window")


def _json_type(value: Any) -> str:
    """What kind of JSON value this is, for messages ("a list", "null")."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object"})
    return names.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A value as JSON spells it: null, true, "false" (quoted, so a string is visible)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # not JSON (a Qwen3Config built in Python)
        return repr(value)


def _check_positive_int(value: Any, name: str, source: str) -> None:
    # bool is an int subclass: true must not read as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {name} must be a positive integer, got {_shown(value)}")


def _check_positive_number(value: Any, name: str, source: str) -> None:
    # 0 or inf would give NaN logits (RoPE frequencies, the norm's 1/sqrt(eps)) and no error.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{source}: {name} must be a finite number > 0, got {_shown(value)}")


def _check_bool(value: Any, name: str, source: str) -> None:
    # The string "false" is truthy: only JSON true/false are accepted.
    if not isinstance(value, bool):
        raise ValueError(
            f"{source}: {name} must be a JSON boolean (true or false), got {_shown(value)}"
        )


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    hidden_size: int = 1024
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    vocab_size: int = 151936
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    torch_dtype: str = "bfloat16"
    source: str = "<defaults>"  # where the config came from, for error messages

    def __post_init__(self):
        for name in _INT_FIELDS:
            _check_positive_int(getattr(self, name), name, self.source)
        _check_bool(self.tie_word_embeddings, "tie_word_embeddings", self.source)
        _check_positive_number(self.rope_theta, "rope_theta", self.source)
        _check_positive_number(self.rms_norm_eps, "rms_norm_eps", self.source)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.source}: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"{self.source}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_size > MAX_HIDDEN_SIZE:
            # The norm kernels hold a whole hidden row in one Triton tile (at most 2**20 elements).
            raise UnsupportedConfigError(
                f"{self.source}: hidden_size {self.hidden_size} is more than the kernels take "
                f"(a hidden row is one tile: at most {MAX_HIDDEN_SIZE})"
            )
        if self.torch_dtype not in _DTYPES:
            raise UnsupportedConfigError(
                f"{self.source}: torch_dtype {self.torch_dtype!r} is not supported "
                f"(supported: {', '.join(_DTYPES)})"
            )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def qkv_size(self) -> int:
        """Output features of the merged q/k/v projection."""
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    @classmethod
    def from_hf_json(cls, path_or_dict: str | Path | dict[str, Any]) -> Qwen3Config:
        """Read a Hugging Face Qwen3 ``config.json`` (a path, a checkpoint folder, or a dict)."""
        if isinstance(path_or_dict, dict):
            raw, source = path_or_dict, "<dict>"
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: config file not found")
            try:
                raw = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            source = str(path)
        if not isinstance(raw, dict):
            raise ValueError(
                f"{source}: a config file must hold a JSON object ({{...}} with fields such as "
                f'"hidden_size"), got {_json_type(raw)}'
            )
        return cls._from_raw(raw, source)

    @classmethod
    def _from_raw(cls, raw: dict[str, Any], source: str) -> Qwen3Config:
        model_type = raw.get("model_type")
        architectures = raw.get("architectures") or []
        # A bare string would pass the membership test below as a substring match.
        if not isinstance(architectures, list) or not all(
            isinstance(a, str) for a in architectures
        ):
            raise ValueError(
                f"{source}: architectures must be a list of strings, got {_shown(architectures)}"
            )
        if model_type != QWEN3_MODEL_TYPE or (
            architectures and QWEN3_ARCHITECTURE not in architectures
        ):
            raise UnsupportedConfigError(
                f"{source}: architecture {architectures or model_type!r} (model_type "
                f"{model_type!r}) is not Qwen3; this engine runs only {QWEN3_ARCHITECTURE} "
                f"(model_type {QWEN3_MODEL_TYPE!r})"
            )
        for name in _BOOL_FIELDS:
            if name in raw:
                _check_bool(raw[name], name, source)
        if raw.get("attention_bias"):
            raise UnsupportedConfigError(f"{source}: attention_bias=true is not implemented")
        if raw.get("use_sliding_window"):
            raise UnsupportedConfigError(f"{source}: use_sliding_window=true is not implemented")
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(
                f"{source}: hidden_act {raw['hidden_act']!r} is not implemented (only 'silu')"
            )
        # transformers < 5 writes rope_theta/rope_scaling; transformers 5 writes rope_parameters.
        rope = raw.get("rope_parameters")
        if rope is None:
            rope = {}
        elif not isinstance(rope, dict):
            raise ValueError(
                f"{source}: rope_parameters must be a JSON object, got {_json_type(rope)}"
            )
        rope_type = rope.get("rope_type", "default")
        if raw.get("rope_scaling") or rope_type != "default":
            raise UnsupportedConfigError(
                f"{source}: RoPE scaling ({raw.get('rope_scaling') or rope_type!r}) is not "
                "implemented (only default RoPE)"
            )
        if "rope_theta" in rope:
            rope_theta, theta_field = rope["rope_theta"], "rope_parameters.rope_theta"
        else:
            rope_theta, theta_field = raw.get("rope_theta", 10000.0), "rope_theta"
        _check_positive_number(rope_theta, theta_field, source)
        rms_norm_eps = raw.get("rms_norm_eps", 1e-6)
        _check_positive_number(rms_norm_eps, "rms_norm_eps", source)
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        for name in (*required, "vocab_size"):
            if name not in raw:
                raise ValueError(f"{source}: missing field {name!r}")
        # Checked before the defaults below are derived from them; only an absent field takes
        # a default (as in transformers), a null or 0 is an error.
        for name in _INT_FIELDS:
            if name in raw:
                _check_positive_int(raw[name], name, source)
        hidden_size, num_heads = raw["hidden_size"], raw["num_attention_heads"]
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        return cls(
            hidden_size=hidden_size,
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads", num_heads),
            head_dim=raw.get("head_dim", hidden_size // num_heads),
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(rms_norm_eps),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            torch_dtype=str(dtype).removeprefix("torch."),
            source=source,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config in Hugging Face's format (round-trips through ``from_hf_json``)."""
        return {
            "architectures": [QWEN3_ARCHITECTURE],
            "model_type": QWEN3_MODEL_TYPE,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.torch_dtype,
            "hidden_act": "silu",
            "attention_bias": False,
        }

    def replace(self, **changes: Any) -> Qwen3Config:
        """A copy with some fields changed (e.g. fewer layers or a smaller hidden size)."""
        return dataclasses.replace(self, **changes)


# The dense Qwen3 sizes the suite benchmarks, tunes for and decodes (`--size`): what differs
# from the 0.6B default in their published config.json files (all four keep 8 KV heads,
# head_dim 128 and the vocabulary; 8B alone has an untied LM head).
QWEN3_SIZES = {
    "0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16},
    "1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
    },
    "4b": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "tie_word_embeddings": False,
    },
}


def qwen3_config(size: str) -> Qwen3Config:
    """The architecture of a dense Qwen3 size ("0.6b", "1.7b", "4b", "8b")."""
    if size not in QWEN3_SIZES:
        raise ValueError(f"unknown Qwen3 size {size!r}; known: {', '.join(QWEN3_SIZES)}")
    return default_config().replace(**QWEN3_SIZES[size], source=f"<Qwen3-{size}>")


# Small enough for the Triton interpreter on 2 CPU cores, with every Qwen3 feature on: GQA
# (2 query heads per KV head), q/k norm, RoPE, tied embeddings. The CPU report and the tests
# run it.
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}


def small_config(**changes) -> Qwen3Config:
    """The small architecture (SMALL), with ``changes``."""
    return default_config().replace(**{**SMALL, **changes}, source="<small>")


def default_config() -> Qwen3Config:
    """The embedded default: the Qwen3-0.6B architecture (engine/qwen3_0_6b.json)."""
    return Qwen3Config.from_hf_json(DEFAULT_CONFIG_PATH)
