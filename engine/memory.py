"""What a model and a generation need in memory, checked before anything is allocated.

A config with a billion layers or a batch of a billion sequences would otherwise grow the
process until the system kills it, or fail deep inside torch with a bare byte count. The
sizes here are arithmetic on the config (no tensor is made); ``check_fits`` compares them with
what the device has free and raises MemoryFitError (a ValueError) saying both.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from engine.config import Qwen3Config


class MemoryFitError(ValueError):
    """The requested model or generation cannot fit on the device."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parameter_count(c: Qwen3Config) -> int:
    """Elements of every weight of the engine's model (merged qkv and gate_up; a tied LM head
    counted once)."""
    per_layer = (
        c.hidden_size * c.qkv_size  # qkv_proj
        + c.num_attention_heads * c.head_dim * c.hidden_size  # o_proj
        + c.hidden_size * 2 * c.intermediate_size  # gate_up_proj
        + c.intermediate_size * c.hidden_size  # down_proj
        + 2 * c.head_dim  # q_norm, k_norm
        + 2 * c.hidden_size  # input and post-attention norms
    )
    embed = c.vocab_size * c.hidden_size
    lm_head = 0 if c.tie_word_embeddings else embed
    return c.num_hidden_layers * per_layer + embed + lm_head + c.hidden_size  # + final norm


@dataclasses.dataclass(frozen=True)
class MemoryNeed:
    """Bytes, by part."""

    weights: int
    rope_tables: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.rope_tables + self.kv_cache + self.activations

    def describe(self) -> str:
        parts = [("weights", self.weights), ("KV cache", self.kv_cache)]
        parts += [("activations", self.activations), ("RoPE tables", self.rope_tables)]
        return ", ".join(f"{name} {gib(n)}" for name, n in parts if n)


def memory_need(
    c: Qwen3Config, dtype: torch.dtype, *, batch: int = 0, seq_len: int = 0, prompt_len: int = 0
) -> MemoryNeed:
    """What a model of ``c`` in ``dtype`` needs, with a KV cache of ``batch`` x ``seq_len``
    positions and a prefill of ``batch`` x ``prompt_len`` tokens (0: none). Activations are an
    upper estimate of the largest step's live tensors (a prefill's q/k/v, gate/up, attention
    scores in float32, logits)."""
    size = _itemsize(dtype)
    kv = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * seq_len * c.head_dim * size
    tokens = batch * max(prompt_len, 1) if batch else 0
    widths = 4 * c.hidden_size + c.qkv_size + 3 * c.intermediate_size
    scores = batch * c.num_attention_heads * prompt_len * prompt_len * 4
    activations = tokens * widths * size + scores + batch * c.vocab_size * 4
    return MemoryNeed(
        weights=parameter_count(c) * size,
        rope_tables=2 * c.max_position_embeddings * (c.head_dim // 2) * 4,
        kv_cache=kv,
        activations=activations,
    )


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the CUDA device's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: int) -> str:
    """Bytes for a message: "70,912 GiB", "1.2 GiB", "16 KiB"."""
    if n < 2**20:
        return f"{n / 2**10:.3g} KiB"
    g = n / 2**30
    return f"{g:,.0f} GiB" if g >= 100 else f"{g:.3g} GiB"


def check_fits(need: MemoryNeed, device: torch.device, what: str) -> None:
    """Raise MemoryFitError unless ``need`` fits in ``device``'s free memory; ``what`` names
    the inputs that asked for it (a config file, options)."""
    free = available_bytes(device)
    if need.total > free:
        raise MemoryFitError(
            f"{what}: {gib(need.total)} needed ({need.describe()}), {gib(free)} free on {device}"
        )
