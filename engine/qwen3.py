"""Qwen3 causal LM for inference: attention, decoder layer, model, LM head.

Each decoder layer at decode (batch of one new token per sequence) launches:
  1 add_rms_norm     (the previous MLP's residual add + this input norm; layer 0: rms_norm)
  2 qkv GEMM         (q, k, v projections merged into one weight)
  3 qk_norm_rope     (q/k RMSNorm + RoPE + KV-cache write)
  4 attention        (decode: Triton kernel over the live length; prefill: torch SDPA)
  5 o_proj_residual  (THE STEP UNDER TEST: fused = 1 kernel, unfused = GEMM + add = 2)
  6 rms_norm         (post-attention norm)
  7 gate_up GEMM     (gate and up projections merged)
  8 silu_mul
  9 down GEMM
i.e. 9 kernels per layer fused, 10 unfused. Fused and unfused share every line except the call
inside ``o_proj_residual``.

The layer returns (mlp_out, residual) and the next layer adds them inside its input norm (as
vLLM does); the attention residual add is never folded anywhere else: it is the measured step.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import Qwen3Config
from engine.flags import FusionFlags
from kernels.decode_attention import decode_attention
from kernels.fused_attn_output import (
    fused_attn_output_residual,
    unfused_attn_output_residual,
)
from kernels.qk_norm_rope import qk_norm_rope_cache_write, rope_tables
from kernels.rms_norm import add_rms_norm, rms_norm
from kernels.silu_mul import silu_mul
from profiling.markers import mark


def o_proj_residual(
    attn_output: torch.Tensor, residual: torch.Tensor, o_proj_weight: torch.Tensor, fused: bool
) -> torch.Tensor:
    """residual + attn_output @ o_proj_weight.T: the step the fusion replaces.

    The decoder layer calls this through the module global, so a test can monkeypatch
    ``engine.qwen3.o_proj_residual`` (e.g. to plant an extra launch).
    """
    if fused:
        # In place: the residual stream is not read again, so no new tensor per layer.
        return fused_attn_output_residual(attn_output, residual, o_proj_weight, out=residual)
    return unfused_attn_output_residual(attn_output, residual, o_proj_weight)


@dataclasses.dataclass
class StepContext:
    """What a forward pass needs besides the token ids.

    positions: [B * tokens_per_seq] device int tensor, the position of every token; token t
    belongs to sequence t // tokens_per_seq. In decode (tokens_per_seq == 1) it is the
    runner's per-sequence position tensor, which a captured CUDA graph reads at replay.
    """

    batch_size: int
    tokens_per_seq: int
    positions: torch.Tensor
    is_prefill: bool


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: the norm of x. With it: residual += x, returns (norm, residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class Qwen3Attention(nn.Module):
    """q/k/v projection, q/k norm + RoPE + cache write, attention. Returns the output BEFORE
    o_proj: the decoder layer applies o_proj together with the residual add."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.qkv_proj = nn.Linear(config.hidden_size, config.qkv_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # Set by the runner: [max_batch, num_kv_heads, max_seq_len, head_dim] each.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext, cos: torch.Tensor, sin: torch.Tensor):
        if self.k_cache is None:
            raise RuntimeError("no KV cache: run the model through engine.runner.Runner")
        qkv = F.linear(x, self.qkv_proj.weight)  # [T, (H + 2 Hkv) D]
        qk_norm_rope_cache_write(
            qkv,
            self.q_norm.weight,
            self.k_norm.weight,
            cos,
            sin,
            ctx.positions,
            self.k_cache,
            self.v_cache,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            tokens_per_seq=ctx.tokens_per_seq,
            eps=self.eps,
        )
        B, P, H, D = ctx.batch_size, ctx.tokens_per_seq, self.num_heads, self.head_dim
        q = qkv[:, : H * D]
        if not ctx.is_prefill:
            out = decode_attention(q.view(B, H, D), self.k_cache, self.v_cache, ctx.positions)
            return out.view(B, H * D)
        # Prefill starts each sequence afresh at position 0: attend causally over the prompt
        # just written to the cache (already in [B, Hkv, P, D] layout).
        q = q.view(B, P, H, D).transpose(1, 2)
        k = self.k_cache[:B, :, :P]
        v = self.v_cache[:B, :, :P]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(B * P, H * D)


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(silu_mul(F.linear(x, self.gate_up_proj.weight)), self.down_proj.weight)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, flags: FusionFlags):
        super().__init__()
        self.flags = flags
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: StepContext,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous MLP output, previous residual) -> (this MLP output, this residual).
        Layer 0 gets (embeddings, None)."""
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attn_out = self.self_attn(normed, ctx, cos, sin)
        with mark("o_proj_residual"):
            hidden = o_proj_residual(
                attn_out, residual, self.self_attn.o_proj.weight, self.flags.fuse_o_proj_residual
            )
        residual = hidden
        return self.mlp(self.post_attention_layernorm(hidden)), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config, flags: FusionFlags):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, flags) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, ctx, cos, sin) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.embed_tokens.weight)
        residual = None
        for i, layer in enumerate(self.layers):
            with mark(f"layer.{i}"):
                hidden, residual = layer(hidden, residual, ctx, cos, sin)
        return self.norm(hidden, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    """Weights in the engine's layout (merged qkv and gate_up); ``hf_weight_map`` names them
    in the Hugging Face checkpoint layout for the loader."""

    def __init__(self, config: Qwen3Config, flags: FusionFlags | None = None):
        super().__init__()
        self.config = config
        self.flags = flags if flags is not None else FusionFlags()
        self.model = Qwen3Model(config, self.flags)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # float32 RoPE tables [max_positions, head_dim / 2], whatever the model dtype.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables on the model's device (after a meta-device build)."""
        c = self.config
        device = self.model.embed_tokens.weight.device
        self.rope_cos, self.rope_sin = rope_tables(
            c.head_dim, c.max_position_embeddings, c.rope_theta, device=device
        )

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not round the RoPE tables: keep them float32.
        cos, sin = self.rope_cos, self.rope_sin
        result = super()._apply(fn, recurse)
        if not cos.is_meta:  # from meta (to_empty), build() calls reset_rope()
            self.rope_cos = cos.to(self.rope_cos.device, torch.float32)
            self.rope_sin = sin.to(self.rope_sin.device, torch.float32)
        return result

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Flat token ids [T] -> logits of the last token of each sequence [B, V]."""
        hidden = self.model(input_ids, ctx, self.rope_cos, self.rope_sin)
        if ctx.tokens_per_seq > 1:
            hidden = hidden.view(ctx.batch_size, ctx.tokens_per_seq, -1)[:, -1]
        return F.linear(hidden, self.lm_head.weight)

    def hf_weight_map(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> where it goes: one of our parameters, or a row slice of one.

        q/k/v land in rows of qkv_proj, gate/up in rows of gate_up_proj. lm_head.weight is
        absent when the embeddings are tied.
        """
        c = self.config
        q_rows = c.num_attention_heads * c.head_dim
        kv_rows = c.num_key_value_heads * c.head_dim
        inter = c.intermediate_size
        names: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": self.model.embed_tokens.weight,
            "model.norm.weight": self.model.norm.weight,
        }
        if not c.tie_word_embeddings:
            names["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            qkv = attn.qkv_proj.weight
            gate_up = mlp.gate_up_proj.weight
            names.update(
                {
                    p + "input_layernorm.weight": layer.input_layernorm.weight,
                    p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                    p + "self_attn.q_proj.weight": qkv[:q_rows],
                    p + "self_attn.k_proj.weight": qkv[q_rows : q_rows + kv_rows],
                    p + "self_attn.v_proj.weight": qkv[q_rows + kv_rows :],
                    p + "self_attn.o_proj.weight": attn.o_proj.weight,
                    p + "self_attn.q_norm.weight": attn.q_norm.weight,
                    p + "self_attn.k_norm.weight": attn.k_norm.weight,
                    p + "mlp.gate_proj.weight": gate_up[:inter],
                    p + "mlp.up_proj.weight": gate_up[inter:],
                    p + "mlp.down_proj.weight": mlp.down_proj.weight,
                }
            )
        return names
