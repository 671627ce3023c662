"""Qwen3 causal LM for inference, written as a program of ops (engine/program.py).

Unfused, each decoder layer at decode (one new token per sequence) runs these ops, one kernel
each:

    residual_add         residual += previous layer's MLP output (not in layer 0)
    input_norm           RMSNorm
    qkv_proj             q, k, v projections merged into one GEMM
    qk_norm_rope         q/k RMSNorm + RoPE + KV-cache write
    attention            decode: Triton kernel over the live length; prefill: torch SDPA
    o_proj               GEMM
    attn_residual_add    residual += attention output
    post_attention_norm  RMSNorm
    gate_up_proj         gate and up projections merged into one GEMM
    silu_mul             SiLU(gate) * up
    down_proj            GEMM -> the MLP output

then ``residual_add``, ``final_norm`` and ``lm_head`` after the last layer. Registered fusions
(engine/fusions.py) replace runs of these ops with one kernel each, as ``model.flags`` says;
fused and unfused paths share the same weights and switch at run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine import fusions as registry
from engine.config import Qwen3Config
from engine.flags import FusionFlags
from engine.program import (
    ACT,
    CONST,
    CTX,
    PARAM,
    BoundOp,
    Op,
    Role,
    run_segments,
    segments,
    span_instances,
)
from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.qk_norm_rope import qk_norm_rope_cache_write, qk_norm_rope_reference, rope_tables
from kernels.rms_norm import rms_norm
from kernels.silu_mul import silu_mul

LAYER_OPS = (
    "input_norm",
    "qkv_proj",
    "qk_norm_rope",
    "attention",
    "o_proj",
    "attn_residual_add",
    "post_attention_norm",
    "gate_up_proj",
    "silu_mul",
    "down_proj",
)


@dataclasses.dataclass
class StepContext:
    """What a forward pass needs besides the token ids.

    positions: [B * tokens_per_seq] device int tensor, the position of every token; token t
    belongs to sequence t // tokens_per_seq. In decode (tokens_per_seq == 1) it is the
    runner's per-sequence position tensor, which a captured CUDA graph reads at replay.
    cos, sin: the model's float32 RoPE tables (set by the model).
    """

    batch_size: int
    tokens_per_seq: int
    positions: torch.Tensor
    is_prefill: bool
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# The ops (their unfused implementation and float64 formula)
# --------------------------------------------------------------------------------------------


def _rms_norm64(residual, norm_weight, eps):
    return norm_weight * residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm64_rounded(dtype, residual, norm_weight, eps):
    """transformers' rounding: the normalised value rounded, times the weight, rounded."""
    normed = (residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (norm_weight.to(dtype).double() * normed.double()).to(dtype).double()


def _add_rounded(dtype, residual, mlp_out):
    """The residual stream is stored in the model's dtype."""
    return (residual + mlp_out).to(dtype).double()


def _silu_mul64(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _silu_mul_bound(inputs, bounds):
    """|d out/d gate| * bound(gate) + |d out/d up| * bound(up) (+ the product of the bounds):
    gate and up may err in opposite directions, so no shared shift of both bounds them."""
    gate, up = inputs["gate_up"].chunk(2, dim=-1)
    d_gate, d_up = bounds["gate_up"].chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    dsilu = s * (1 + gate * (1 - s))
    return (up * dsilu).abs() * d_gate + (gate * s).abs() * d_up + d_gate * d_up


# A span that reads the KV cache is drawn at decode, with caches of this many positions and
# each sequence's new token at a random position below it.
DRAWN_CONTEXT = 64


def _draw_ctx(config, rows, dtype, device, generator):
    """A decode step's context: one token per sequence, positions in 1..DRAWN_CONTEXT-1."""
    cos, sin = rope_tables(config.head_dim, DRAWN_CONTEXT, config.rope_theta, device=device)
    positions = torch.randint(1, DRAWN_CONTEXT, (rows,), device=device, generator=generator)
    return StepContext(rows, 1, positions.to(torch.int32), False, cos, sin)


def _draw_cache(config, rows, dtype, device, generator):
    """A KV cache [rows, Hkv, DRAWN_CONTEXT, D] of N(0, 1) values."""
    shape = (rows, config.num_key_value_heads, DRAWN_CONTEXT, config.head_dim)
    return torch.randn(*shape, device=device, generator=generator).to(dtype)


def qwen3_ops(config: Qwen3Config) -> dict[str, Op]:
    """The ops of a Qwen3 model with this config, by name."""
    H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = Role("eps", CONST, source="rms_norm_eps")
    ctx = Role("ctx", CTX, draw=_draw_ctx)

    def act(name, *dims):
        return Role(name, ACT, dims)

    def param(name, source, *dims, init="weight"):
        return Role(name, PARAM, dims, source, init)

    def add_mlp_out(residual, mlp_out):
        return residual + mlp_out

    def add_o(residual, o):
        return residual + o

    def norm(name, source):
        return Op(
            name,
            (act("residual", "hidden"), param("norm_weight", source, "hidden", init="norm"), eps),
            "normed",
            lambda residual, norm_weight, eps: rms_norm(residual, norm_weight, eps),
            _rms_norm64,
            fn64_rounded=_rms_norm64_rounded,
            group="norm",
            out_dims=("hidden",),
        )

    def linear(name, x, weight, source, out, dims):
        def fn(**kw):
            return F.linear(kw[x], kw[weight])

        def fn64(**kw):
            return kw[x] @ kw[weight].T

        return Op(
            name,
            (act(x, dims[1]), param(weight, source, *dims)),
            out,
            fn,
            fn64,
            group="gemm",
            accumulates=(x, weight),
            out_dims=(dims[0],),
        )

    def qk_norm_rope(qkv, q_norm_weight, k_norm_weight, k_cache, v_cache, ctx):
        return qk_norm_rope_cache_write(
            qkv,
            q_norm_weight,
            k_norm_weight,
            ctx.cos,
            ctx.sin,
            ctx.positions,
            k_cache,
            v_cache,
            num_heads=H,
            num_kv_heads=Hkv,
            head_dim=D,
            tokens_per_seq=ctx.tokens_per_seq,
            eps=config.rms_norm_eps,
        )

    def qk_norm_rope64(qkv, q_norm_weight, k_norm_weight, k_cache, v_cache, ctx):
        """The formula on float64 inputs: q normed and rotated in qkv, k (normed, rotated) and
        v written to the caches at each token's position."""
        q, k, v = qk_norm_rope_reference(
            qkv, q_norm_weight, k_norm_weight, ctx.cos, ctx.sin, ctx.positions,
            num_heads=H, num_kv_heads=Hkv, head_dim=D, eps=config.rms_norm_eps,
        )  # fmt: skip
        T = qkv.shape[0]
        seq = torch.arange(T, device=qkv.device) // ctx.tokens_per_seq
        pos = ctx.positions.long()
        k_cache[seq, :, pos] = k
        v_cache[seq, :, pos] = v
        return torch.cat([q.reshape(T, H * D), qkv[:, H * D :]], dim=-1)

    def attention64(qkv, k_cache, v_cache, ctx):
        """Decode attention on float64 inputs (one token per sequence)."""
        B = ctx.batch_size
        q = qkv[:, : H * D].reshape(B, H, D)
        return decode_attention_reference(q, k_cache, v_cache, ctx.positions).reshape(B, H * D)

    def attention(qkv, k_cache, v_cache, ctx):
        B, P = ctx.batch_size, ctx.tokens_per_seq
        q = qkv[:, : H * D]
        if not ctx.is_prefill:
            return decode_attention(q.view(B, H, D), k_cache, v_cache, ctx.positions).view(B, H * D)
        # Prefill starts each sequence afresh at position 0: attend causally over the prompt
        # just written to the cache (already in [B, Hkv, P, D] layout).
        q = q.view(B, P, H, D).transpose(1, 2)
        k, v = k_cache[:B, :, :P], v_cache[:B, :, :P]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(B * P, H * D)

    def lm_head(normed, lm_head_weight, ctx):
        if ctx.tokens_per_seq > 1:  # prefill: the last token of each sequence
            normed = normed.view(ctx.batch_size, ctx.tokens_per_seq, -1)[:, -1]
        return F.linear(normed, lm_head_weight)

    def kv_bytes(config, rows, context_len, itemsize):
        # decode: each sequence's keys and values over its live length
        return 2 * rows * Hkv * context_len * D * itemsize

    caches = tuple(
        Role(name, PARAM, source=f"self_attn.{name}", draw=_draw_cache)
        for name in ("k_cache", "v_cache")
    )
    ops = [
        Op(
            "embed",
            # Reads one embedding row per token, not the table: extra_bytes, no dims.
            (Role("ids"), param("embed_weight", "model.embed_tokens.weight")),
            "residual",
            lambda ids, embed_weight: F.embedding(ids, embed_weight),
            out_dims=("hidden",),
            extra_bytes=lambda config, rows, context_len, itemsize: (
                rows * config.hidden_size * itemsize
            ),
        ),
        Op(
            "residual_add",
            (act("residual", "hidden"), act("mlp_out", "hidden")),
            "residual",
            add_mlp_out,
            add_mlp_out,
            fn64_rounded=_add_rounded,
            out_dims=("hidden",),
        ),
        norm("input_norm", "input_layernorm.weight"),
        linear(
            "qkv_proj",
            "normed",
            "qkv_weight",
            "self_attn.qkv_proj.weight",
            "qkv",
            ("qkv_size", "hidden"),
        ),
        Op(
            "qk_norm_rope",
            (
                act("qkv", "qkv_size"),
                param("q_norm_weight", "self_attn.q_norm.weight", "head_dim", init="norm"),
                param("k_norm_weight", "self_attn.k_norm.weight", "head_dim", init="norm"),
                *caches,
                ctx,
            ),
            "qkv",
            qk_norm_rope,
            qk_norm_rope64,
            out_dims=("qkv_size",),
        ),
        Op(
            "attention",
            (act("qkv", "q_size"), *caches, ctx),
            "attn",
            attention,
            attention64,
            group="attention",
            out_dims=("q_size",),
            extra_bytes=kv_bytes,
        ),
        linear(
            "o_proj", "attn", "o_proj_weight", "self_attn.o_proj.weight", "o", ("hidden", "q_size")
        ),
        Op(
            "attn_residual_add",
            (act("residual", "hidden"), act("o", "hidden")),
            "residual",
            add_o,
            add_o,
            out_dims=("hidden",),
        ),
        norm("post_attention_norm", "post_attention_layernorm.weight"),
        linear(
            "gate_up_proj",
            "normed",
            "gate_up_weight",
            "mlp.gate_up_proj.weight",
            "gate_up",
            ("gate_up", "hidden"),
        ),
        Op(
            "silu_mul",
            (act("gate_up", "gate_up"),),
            "act",
            silu_mul,
            _silu_mul64,
            out_dims=("intermediate",),
            propagate=_silu_mul_bound,
        ),
        linear(
            "down_proj",
            "act",
            "down_proj_weight",
            "mlp.down_proj.weight",
            "mlp_out",
            ("hidden", "intermediate"),
        ),
        norm("final_norm", "model.norm.weight"),
        Op(
            "lm_head",
            (
                act("normed", "hidden"),
                param("lm_head_weight", "lm_head.weight", "vocab", "hidden"),
                ctx,
            ),
            "logits",
            lm_head,
            group="gemm",
            out_dims=("vocab",),
        ),
    ]
    return {op.name: op for op in ops}


# --------------------------------------------------------------------------------------------
# Modules: where the weights live (and the names the loader maps checkpoints to)
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.qkv_proj = nn.Linear(config.hidden_size, config.qkv_size, bias=False)
        q_size = config.num_attention_heads * config.head_dim
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        # Set by the runner: [max_batch, num_kv_heads, max_seq_len, head_dim] each.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@contextlib.contextmanager
def on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Build modules on the meta device with ``dtype`` as the default (then ``allocate``
    them once: no throwaway initialisation of 0.6B parameters on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


class Qwen3ForCausalLM(nn.Module):
    """Weights in the engine's layout (merged qkv and gate_up); ``hf_weight_map`` names them
    in the Hugging Face checkpoint layout for the loader. ``flags`` chooses the fusions."""

    def __init__(self, config: Qwen3Config, flags: FusionFlags | None = None):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # float32 RoPE tables [max_positions, head_dim / 2], whatever the model dtype.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope()
        self.ops = qwen3_ops(config)
        self._segments: dict[tuple, list] = {}
        self.flags = flags if flags is not None else self.default_flags()

    def program(self) -> list[BoundOp]:
        """The unfused model as bound ops, in execution order."""
        ops, out = self.ops, [BoundOp(self.ops["embed"], self, None)]
        for i, layer in enumerate(self.model.layers):
            if i > 0:
                out.append(BoundOp(ops["residual_add"], layer, i))
            out += [BoundOp(ops[name], layer, i) for name in LAYER_OPS]
        for name in ("residual_add", "final_norm", "lm_head"):
            out.append(BoundOp(ops[name], self, None))
        return out

    @property
    def not_applicable(self) -> list[str]:
        """Registered fusions with no span in this program (they never run here)."""
        program = self.program()
        return [f.name for f in registry.all_fusions() if not span_instances(program, f)]

    def unavailable(self) -> dict[str, str]:
        """Registered fusions whose kernel cannot run for this model: name -> why (none in a
        single process; engine/parallel.py's model has some)."""
        return {}

    def default_flags(self) -> FusionFlags:
        """The default fusions that apply to this program and can run here (a tensor-parallel
        process also registers fusions of all-reduces, which a single-process program has
        none of)."""
        return FusionFlags.default(exclude=[*self.not_applicable, *self.unavailable()])

    def segments(self) -> list:
        """The program cut by the enabled fusions (cached per flag setting)."""
        key = self.flags.key()
        if key not in self._segments:
            self._segments[key] = segments(
                self.program(), self.flags.fusions(), self.config, returns=("logits",)
            )
        return self._segments[key]

    def allocate(self, device: torch.device) -> Qwen3ForCausalLM:
        """Storage on ``device`` for a model built on the meta device (values undefined until
        loaded or drawn), tied, RoPE tables computed, no gradients."""
        self.to_empty(device=device)
        self.tie_weights()
        self.reset_rope()
        self.requires_grad_(False)
        return self

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
        if self.model.layers[0].self_attn.k_cache is None:
            raise RuntimeError("no KV cache: run the model through engine.runner.Runner")
        ctx.cos, ctx.sin = self.rope_cos, self.rope_sin
        state = run_segments(self.segments(), {"ids": input_ids, "ctx": ctx})
        return state["logits"]

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
