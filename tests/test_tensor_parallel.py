"""Tensor-parallel decode (engine/parallel.py): two ranks in two processes (gloo, CPU) compute
what one process computes, from the same random weights or a checkpoint sharded per rank; the
program gets an all-reduce after each row-parallel projection and nothing else changes; fusions
that no longer apply are left out of the default and refused when asked for; all_reduce_residual
falls back to its unfused ops where its kernel cannot run, saying why; a layout or launch that
cannot work is an error naming the field or option (exit 2 from the CLI).

Every comparison is shown able to fail: dropping the all-reduces, or loading another rank's
part of the checkpoint, moves the logits far outside the bound. GPU-only tests (NCCL, symmetric
memory, CUDA graphs under TP) are marked gpu and need two GPUs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import tp_workers
from engine_helpers import (
    assert_greedy_equal,
    assert_logits_close,
    compile_for_hopper,
    small_config,
)

import engine
from engine import fusions as registry
from engine import parallel as tp
from engine.__main__ import main
from engine.flags import FusionFlags
from engine.loader import CheckpointError
from engine.parallel import NotApplicable, Parallel, ParallelError
from engine.program import span_instances
from engine.qwen3 import LAYER_OPS, Qwen3ForCausalLM
from kernels import all_reduce_residual as ar
from kernels.runtime import INTERPRETING

ROOT = Path(__file__).resolve().parents[1]
CONFIG = small_config(num_hidden_layers=2)  # 4 query heads, 2 KV heads, intermediate 128
STEPS = 4
# fp32: TP changes only the order of float32 sums. o_proj's and down_proj's dot products are
# two partial sums (one per rank) added by the all-reduce, and the local projections' kernels
# may tile K differently at the local widths: each moves an output by a few ulps of its terms'
# scale, and the norms and layers carry that to the logits at their own scale. Measured: 1-2
# ulps of max |logit| (2 layers); 16 leaves an 8x margin. A missing all-reduce (or another
# rank's weights) moves the logits by ~1e-1: 10^5 ulps.
TP_ULPS = 16
EPS32 = torch.finfo(torch.float32).eps
UNFUSED_UNDER_TP = {"o_proj_residual", "down_proj_residual"}
# The TP default: the single-process defaults that still apply, and the TP-only defaults.
TP_DEFAULT = FusionFlags.default(exclude=UNFUSED_UNDER_TP).enabled | {
    f.name for f in tp.TP_FUSIONS if f.default
}
# On CPU (gloo) all_reduce_residual's kernel cannot run: the default leaves it out, saying why.
TP_DEFAULT_ON_CPU = TP_DEFAULT - {"all_reduce_residual"}


def _bound(ref: torch.Tensor) -> dict:
    return {"max_abs": TP_ULPS * EPS32 * ref.abs().max().item(), "norm_rel": TP_ULPS * EPS32}


def _teacher_forced(model, prompt, tokens):
    """Logits [B, steps, V] of a single-process model fed ``tokens`` (each step alone)."""
    runner = engine.Runner(model, max_batch_size=prompt.shape[0], max_seq_len=64)
    logits = [runner.prefill(prompt).float()]
    for i in range(tokens.shape[1] - 1):
        logits.append(runner.decode(tokens[:, i]).float())
    return torch.stack(logits, 1)


def _assert_matches(got, tokens, ref, what):
    assert_logits_close(got, ref, **_bound(ref), what=what)
    margin = 2 * (got - ref).abs().max().item()
    assert_greedy_equal(tokens, ref, margin=margin, what=what)


# CPU-path tests that compare gloo ranks with a CPU model built in this process: on a GPU
# runner the kernels run compiled and cannot take CPU tensors (the NCCL tests below cover GPUs).
cpu_ranks = pytest.mark.skipif(
    not INTERPRETING, reason="gloo ranks on CPU tensors; on GPUs the NCCL tests cover this"
)


@pytest.fixture
def tp_fusions():
    """The TP-only registry entry for this test alone (building a sharded model in this
    process registers it; other tests must see the single-process registry)."""
    with registry.rank_fusions_listed():
        yield


def _one_process(run: dict) -> str:
    """A rank's fusions (``run["flags"]``) for the single-process model: all but the TP-only
    ones (one process has no all-reduce to fuse)."""
    tp_only = {f.name for f in tp.TP_FUSIONS}
    return ",".join(f for f in run["flags"].split(",") if f and f not in tp_only) or "none"


def _sharded(rank=0, world_size=2, config=CONFIG, **kwargs):
    """One rank's model built in this process (no process group: nothing is run)."""
    return engine.build(
        config, dtype=torch.float32, device="cpu", parallel=Parallel(rank, world_size), **kwargs
    )


# --------------------------------------------------------------------------------------------
# Two ranks against one process
# --------------------------------------------------------------------------------------------


@cpu_ranks
@pytest.mark.parametrize("flags", ["none", "default"])
def test_two_ranks_match_one_process(tmp_path, flags):
    """Same seed, same weights: TP=2 logits within a few fp32 ulps of TP=1 and the same greedy
    tokens; both ranks agree bit for bit; dropping the all-reduces is caught."""
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 5))
    runs = [("tp", flags, False), ("planted", flags, True)]
    ranks = tp_workers.run_ranks(tp_workers.generate, tmp_path, CONFIG, prompt, STEPS, runs)
    got = ranks[0]["tp"]
    assert torch.equal(got["logits"], ranks[1]["tp"]["logits"]), "the ranks disagree"
    expected = set() if flags == "none" else TP_DEFAULT_ON_CPU
    assert set(filter(None, got["flags"].split(","))) == expected
    said = "all_reduce_residual is not available here: the tensors are on cpu"
    assert (said in got["warnings"]) == (flags == "default"), got["warnings"]
    assert got["not_applicable"] == "o_proj_residual,down_proj_residual,mlp_block"
    assert "o_proj,o_proj_all_reduce,attn_residual_add" in got["segments"]
    assert "down_proj,down_proj_all_reduce,residual_add" in got["segments"]
    # One process, the same fusions (only the split differs), fed the same tokens.
    model = engine.build(CONFIG, dtype=torch.float32, device="cpu", flags=_one_process(got))
    ref = _teacher_forced(model, prompt, got["tokens"])
    _assert_matches(got["logits"], got["tokens"], ref, f"TP=2 vs TP=1 ({flags})")
    planted = ranks[0]["planted"]["logits"]
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        assert_logits_close(planted, ref, **_bound(ref), what="all-reduces dropped")


def _write_checkpoint(model, directory: Path) -> Path:
    """The model as an HF checkpoint in two files with an index (norms perturbed, so that a
    norm loaded into the wrong place shows)."""
    directory.mkdir()
    state = {}
    for name, t in model.hf_weight_map().items():
        t = t.detach().clone()
        state[name] = t + 0.2 * torch.randn_like(t) if name.endswith("norm.weight") else t
    names = sorted(state)
    files = {"model-00001-of-00002.safetensors": names[::2]}
    files["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for file_name, part in files.items():
        safetensors.torch.save_file({n: state[n] for n in part}, directory / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    return directory


def _expected_part(state, config, rank, world_size):
    """Rank ``rank``'s layer-0 weights assembled head by head from the full checkpoint."""
    H, Hkv, D, inter = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
    )
    p = "model.layers.0."
    q_heads = range(rank * H // world_size, (rank + 1) * H // world_size)
    kv_heads = range(rank * Hkv // world_size, (rank + 1) * Hkv // world_size)
    rows = list(range(rank * inter // world_size, (rank + 1) * inter // world_size))

    def heads(name, hs):
        return torch.cat([state[p + name][h * D : (h + 1) * D] for h in hs])

    q_cols = [c for h in q_heads for c in range(h * D, (h + 1) * D)]
    qkv = [heads("self_attn.q_proj.weight", q_heads), heads("self_attn.k_proj.weight", kv_heads)]
    qkv.append(heads("self_attn.v_proj.weight", kv_heads))
    gate_up = [state[p + "mlp.gate_proj.weight"][rows], state[p + "mlp.up_proj.weight"][rows]]
    return {
        "qkv": torch.cat(qkv),
        "o_proj": state[p + "self_attn.o_proj.weight"][:, q_cols],
        "gate_up": torch.cat(gate_up),
        "down_proj": state[p + "mlp.down_proj.weight"][:, rows],
        "q_norm": state[p + "self_attn.q_norm.weight"],
    }


@cpu_ranks
def test_a_checkpoint_loads_sharded_per_rank(tmp_path):
    """Each rank holds its heads' rows of q, k, v (merged), the matching columns of o_proj, its
    rows of gate and up, the matching columns of down_proj, the norms whole; the logits are the
    single-process model's; another rank's part is caught."""
    source = engine.build(CONFIG, dtype=torch.float32, device="cpu", seed=5)
    checkpoint = _write_checkpoint(source, tmp_path / "checkpoint")
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 5))
    ranks = tp_workers.run_ranks(tp_workers.load_sharded, tmp_path, checkpoint, prompt, STEPS)
    state = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(f))
    for rank, result in enumerate(ranks):
        for name, want in _expected_part(state, CONFIG, rank, 2).items():
            assert torch.equal(result["weights"][name], want), (rank, name)
    model = engine.build(checkpoint=checkpoint, dtype=torch.float32, device="cpu", flags="none")
    got = ranks[0]
    ref = _teacher_forced(model, prompt, got["tokens"])
    _assert_matches(got["logits"], got["tokens"], ref, "sharded checkpoint vs TP=1")
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        assert_logits_close(got["wrong_part"], ref, **_bound(ref), what="rank 0's part twice")


@cpu_ranks
def test_all_reduce_residual_falls_back_on_gloo_with_a_warning(tmp_path):
    """On CPU/gloo the one-shot kernel cannot run: the engine warns (on rank 0) why, runs the
    unfused ops and gets the default's logits bit for bit; the launcher itself raises saying
    why; the kernel file's references agree with the float64 sum of every rank's partial."""
    prompt = torch.randint(0, CONFIG.vocab_size, (1, 4))
    on = ",".join(sorted(TP_DEFAULT | {"all_reduce_residual"}))
    runs = [("on", on, False), ("default", "default", False)]
    ranks = tp_workers.run_ranks(tp_workers.generate, tmp_path, CONFIG, prompt, 3, runs)
    result = ranks[0]["on"]
    assert "all_reduce_residual is not available here: the tensors are on cpu" in result["warnings"]
    assert "Running its ops unfused" in result["warnings"]
    assert ranks[1]["on"]["warnings"] == ""  # only rank 0 says it
    assert "all_reduce_residual" in result["flags"]
    assert "all_reduce_residual" not in result["segments"].split(",")
    assert torch.equal(result["logits"], ranks[0]["default"]["logits"])

    paths = tp_workers.run_ranks(tp_workers.all_reduce_residual_paths, tmp_path, 3, 64)
    exact = paths[0]["x"].double() + paths[1]["x"].double() + paths[0]["residual"].double()
    for rank in paths:
        assert torch.equal(rank["exact"], exact)
        # Two fp32 roundings (the partials' sum, then the add): each within half an ulp of
        # the sum of the terms' magnitudes.
        terms = paths[0]["x"].abs() + paths[1]["x"].abs() + paths[0]["residual"].abs()
        err = (rank["unfused"].double() - exact).abs()
        assert (err <= EPS32 * terms.double()).all()
        assert "cannot run here: the tensors are on cpu" in rank["error"]
        assert rank["reason"].startswith("the tensors are on cpu")


# --------------------------------------------------------------------------------------------
# The program, the layout and the weights of one rank (in this process: nothing runs)
# --------------------------------------------------------------------------------------------


def test_world_size_1_is_the_single_process_engine():
    model = engine.build(CONFIG, dtype=torch.float32, device="cpu", parallel=Parallel.single())
    plain = engine.build(CONFIG, dtype=torch.float32, device="cpu")
    assert type(model) is Qwen3ForCausalLM
    assert [b.op.name for b in model.program()] == [b.op.name for b in plain.program()]
    assert not any("all_reduce" in b.op.name for b in model.program())
    assert "all_reduce_residual" not in {f.name for f in registry.all_fusions()}
    assert "all_reduce_residual" in {f.name for f in registry.rank_fusions()}
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_each_row_parallel_projection_is_followed_by_an_all_reduce(tp_fusions):
    model = _sharded(rank=1, flags="none")
    names = [b.op.name for b in model.program()]
    layer = list(LAYER_OPS)
    layer.insert(layer.index("o_proj") + 1, "o_proj_all_reduce")
    layer.insert(layer.index("down_proj") + 1, "down_proj_all_reduce")
    expected = ["embed", *layer, "residual_add", *layer, "residual_add", "final_norm", "lm_head"]
    assert names == expected
    c, full = model.config, model.full_config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 1, 64)
    assert full == CONFIG and c.hidden_size == full.hidden_size
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_proj.weight.shape == ((2 + 2 * 1) * 16, 64)
    assert attn.o_proj.weight.shape == (64, 2 * 16)
    assert mlp.gate_up_proj.weight.shape == (2 * 64, 64)
    assert mlp.down_proj.weight.shape == (64, 64)
    assert model.lm_head.weight.shape == (CONFIG.vocab_size, 64)


def test_random_weights_are_the_single_process_weights_sliced(tp_fusions):
    full = engine.build(CONFIG, dtype=torch.float32, device="cpu", seed=3)
    state = {n: t for n, t in full.hf_weight_map().items()}
    for rank in range(2):
        part = _sharded(rank=rank, seed=3)
        layer = part.model.layers[0]
        got = {
            "qkv": layer.self_attn.qkv_proj.weight,
            "o_proj": layer.self_attn.o_proj.weight,
            "gate_up": layer.mlp.gate_up_proj.weight,
            "down_proj": layer.mlp.down_proj.weight,
            "q_norm": layer.self_attn.q_norm.weight,
        }
        for name, want in _expected_part(state, CONFIG, rank, 2).items():
            assert torch.equal(got[name], want), (rank, name)
        assert torch.equal(part.model.embed_tokens.weight, full.model.embed_tokens.weight)
        assert part.lm_head.weight is part.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize(("heads", "kv_heads", "world_size"), [(4, 2, 2), (8, 2, 2), (16, 8, 4)])
def test_each_local_query_head_keeps_its_kv_head(heads, kv_heads, world_size):
    """GQA pairs query head h with KV head h // (H / Hkv); a rank's blocks of both keep it."""
    local_h, local_kv = heads // world_size, kv_heads // world_size
    for rank in range(world_size):
        for j in range(local_h):
            local_pair = rank * local_kv + j // (local_h // local_kv)
            assert local_pair == (rank * local_h + j) // (heads // kv_heads)


def test_every_tensor_is_split_or_replicated_and_the_parts_make_the_whole():
    full = engine.build(
        CONFIG.replace(tie_word_embeddings=False), dtype=torch.float32, device="cpu"
    )
    split = {n for n in full.hf_weight_map() if tp.split_dim(n) is not None}
    assert {n.split(".", 3)[-1] for n in split} == set(tp.SPLIT_DIM)
    for name, t in full.hf_weight_map().items():
        parts = [Parallel(r, 2).take(name, t) for r in range(2)]
        d = tp.split_dim(name)
        if d is None:
            assert all(p is t for p in parts), name
        else:
            assert torch.equal(torch.cat(parts, d), t), name
            assert Parallel(0, 2).full_shape(name, tuple(parts[0].shape)) == tuple(t.shape)


def test_fusions_that_no_longer_apply_are_left_out_or_refused(tp_fusions):
    with pytest.warns(RuntimeWarning, match="all_reduce_residual is not available here"):
        model = _sharded()
    assert model.not_applicable == ["o_proj_residual", "down_proj_residual", "mlp_block"]
    assert model.flags.enabled == TP_DEFAULT_ON_CPU
    with pytest.raises(NotApplicable, match="o_proj_residual, down_proj_residual do not apply"):
        model.flags = FusionFlags(TP_DEFAULT - {"all_reduce_residual"} | UNFUSED_UNDER_TP)
    with pytest.raises(NotApplicable, match="down_proj_residual do not apply"):
        _sharded(flags="down_proj_residual")
    # Changed in place after assignment: refused when the program is cut.
    model.flags.set(all_reduce_residual=False, o_proj_residual=True)
    with pytest.raises(NotApplicable, match="o_proj_residual do not apply"):
        model.segments()
    # The rest runs on the local shards; add_rms_norm (an alternative) too.
    model.flags = FusionFlags(["add_rms_norm", "norm_gate_up_silu"])
    fused = [s.name for s in model.segments() if s.fusion]
    assert fused.count("add_rms_norm") == 2 and fused.count("norm_gate_up_silu") == 2
    program = model.program()
    all_reduce_residual = registry.get("all_reduce_residual")
    assert len(span_instances(program, all_reduce_residual)) == 2 * CONFIG.num_hidden_layers
    alternatives = {f.name for f in registry.all_fusions() if f.conflicts_with(all_reduce_residual)}
    assert alternatives == {"o_proj_residual", "down_proj_residual", "add_rms_norm", "mlp_block"}


def test_the_launcher_raises_where_its_kernel_cannot_run():
    x, residual = torch.randn(2, 64), torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="cannot run here: the tensors are on cpu"):
        ar.all_reduce_residual(x, residual)
    assert ar.float64_reference([x, 2 * x], residual).dtype == torch.float64


def test_nvlink_multicast_is_off():
    assert {k: os.environ.get(k) for k in tp.NO_MULTICAST} == tp.NO_MULTICAST
    code = [
        line
        for line in Path(ar.__file__).read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    source = "\n".join(code)
    assert "multimem." not in source and "multicast_ptr" not in source


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import all_reduce_residual as ar

for dtype, size in (("*fp32", 4), ("*bf16", 2)):
    for world_size in (2, 8):
        layout = ar.buffer_layout(2048, world_size)
        shape = ar.launch_shape(8 * 4096, size, layout)
        signature = dict.fromkeys(("x_ptr", "residual_ptr", "out_ptr"), dtype)
        signature.update(buffer_ptrs="i64", signal_pad_ptrs="i64", epoch_ptr="*i32")
        signature.update(numel="i32", rank="i32")
        signature.update(dict.fromkeys(("WORLD_SIZE", "BLOCK", "SLOTS", "REGION"), "constexpr"))
        constexprs = {"WORLD_SIZE": world_size, "BLOCK": shape.block, "SLOTS": layout.slots}
        constexprs["REGION"] = layout.region_bytes // size
        # What the launcher's JIT assumes of 16-byte aligned tensors and a numel % 16 == 0.
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 5, 6)}
        source = ASTSource(
            fn=ar._one_shot_all_reduce_residual_kernel,
            signature=signature,
            constexprs=constexprs,
            attrs=attrs,
        )
        options = {"num_warps": shape.num_warps}
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert kernel.asm["cubin"], (dtype, world_size)
        print("=== KERNEL", dtype, world_size)
        print(kernel.asm["ptx"])
"""


def test_the_one_shot_kernel_compiles_for_hopper():
    """No GPU here, but Triton compiles for one: the untested CUDA path is at least valid
    Triton and PTX (ptxas takes its flag instructions). Each kernel meets its peers once (one
    system-scope release store, one acquire spin, no 0/1 compare-and-swap to reset), moves
    the peers' data in 16-byte vectors and has no multicast instruction."""
    result = compile_for_hopper(_COMPILE, TRITON_DEFAULT_FP_FUSION="1")
    assert result.returncode == 0, result.stderr
    kernels = result.stdout.split("=== KERNEL")[1:]
    assert len(kernels) == 4
    for ptx in kernels:
        what = ptx.splitlines()[0]
        assert ptx.count("st.release.sys.global.u32") == 1, what
        assert ptx.count("ld.acquire.sys.global.u32") == 1, what
        assert "atom." not in ptx and "multimem" not in ptx, what
        # The peers' slots: 16-byte loads, none element-wise (Triton 3.9 marks them .cv,
        # Triton 3.6 drops the modifier: the acquire before them orders them either way).
        assert re.search(r"ld\.global(\.cv)?\.v4", ptx), what
        assert not re.search(r"ld\.global\.cv\.b(16|32)", ptx), what


def test_one_shot_blocks_own_fixed_regions_and_fit_the_signal_pad():
    """Decode partials take one program (two to eight at [8, hidden]); every program's data
    fits its region, every region and flag fits the buffer and the pad; a pad too small for
    one block's flags is refused."""
    for pad in (2048, 9216):
        for world_size in (2, 4, 8):
            layout = ar.buffer_layout(pad, world_size)
            assert layout.slots * world_size * 4 <= pad
            assert layout.slots & (layout.slots - 1) == 0
            assert layout.slots * layout.region_bytes == ar.ONE_SHOT_MAX_BYTES
            assert layout.buffer_bytes(world_size) == 2 * world_size * ar.ONE_SHOT_MAX_BYTES
            assert layout.region_bytes % 16 == 0
            for size in (2, 4):
                for numel in (1, 1000, 1024, 4096, 4097, 8 * 4096, ar.ONE_SHOT_MAX_BYTES // size):
                    shape = ar.launch_shape(numel, size, layout)
                    assert shape.block & (shape.block - 1) == 0
                    assert shape.block * size <= layout.region_bytes
                    assert (shape.blocks - 1) * shape.block < numel <= shape.blocks * shape.block
                    assert shape.blocks <= layout.slots
                    assert 4 <= shape.num_warps <= 16
    layout = ar.buffer_layout(2048, 2)
    assert (layout.slots, layout.region_bytes) == (128, 8192)
    bf16 = [ar.launch_shape(rows * hidden, 2, layout).blocks for rows, hidden in
            ((1, 1024), (1, 4096), (8, 1024), (8, 4096))]  # fmt: skip
    assert bf16 == [1, 1, 2, 8]
    assert ar.buffer_layout(2048, 8) == ar.BufferLayout(64, 16384)
    assert ar.launch_shape(8 * 4096, 2, ar.buffer_layout(2048, 8)).blocks == 4
    with pytest.raises(ValueError, match="no room for one block's flags from 8 ranks"):
        ar.buffer_layout(16, 8)
    with pytest.raises(ValueError, match="not a one-shot size"):
        ar.launch_shape(ar.ONE_SHOT_MAX_BYTES // 2 + 1, 2, layout)


# --------------------------------------------------------------------------------------------
# Input that cannot work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "world_size", "field"),
    [
        ({}, 3, "num_attention_heads (4)"),
        ({"num_key_value_heads": 1}, 2, "num_key_value_heads (1)"),
        ({"intermediate_size": 130}, 4, "num_key_value_heads (2)"),
        ({"intermediate_size": 129}, 2, "intermediate_size (129)"),
    ],
)
def test_a_layout_that_does_not_divide_names_the_field(changes, world_size, field):
    config = small_config(**changes)
    message = f"{re.escape(field)} is not divisible by the tensor-parallel size {world_size}"
    with pytest.raises(ParallelError, match=message):
        engine.build(config, dtype=torch.float32, device="cpu", parallel=Parallel(0, world_size))


def test_rank_and_world_size_are_checked():
    with pytest.raises(ParallelError, match="rank 2 is out of range for world_size 2"):
        Parallel(2, 2)
    with pytest.raises(ParallelError, match="world_size must be >= 1"):
        Parallel(0, 0)
    with pytest.raises(ParallelError, match="rank must be an integer"):
        Parallel(True, 2)


def test_a_wrongly_shaped_checkpoint_names_the_tensor_and_file(tmp_path, tp_fusions):
    source = engine.build(CONFIG, dtype=torch.float32, device="cpu")
    checkpoint = _write_checkpoint(source, tmp_path / "checkpoint")
    target = next(iter(sorted(checkpoint.glob("*.safetensors"))))
    state = safetensors.torch.load_file(target)
    name = next(n for n in state if n.endswith("k_proj.weight"))
    state[name] = state[name][:16]  # one KV head instead of two
    safetensors.torch.save_file(state, target)
    with pytest.raises(CheckpointError) as excinfo:
        engine.build(
            checkpoint=checkpoint, dtype=torch.float32, device="cpu", parallel=Parallel(1, 2)
        )
    message = str(excinfo.value)
    assert f"tensor {name!r} in {target}" in message and "the config needs (32, 64)" in message


def _config_file(tmp_path, **changes) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**small_config().to_hf_dict(), **changes}))
    return str(path)


def _cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as excinfo:
        main(["--dtype", "float32", *args])
    assert excinfo.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_cli_tp_that_does_not_divide_the_heads(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _config_file(tmp_path)
    line = _cli_error(capsys, "--config", config, "--tp", "3")
    assert line.startswith(f"error: {config}: num_attention_heads (4) is not divisible"), line
    assert "--tp 3" in line


def test_cli_kv_heads_that_do_not_divide(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _config_file(tmp_path, num_key_value_heads=1)
    line = _cli_error(capsys, "--config", config, "--tp", "2")
    assert "num_key_value_heads (1) is not divisible by the tensor-parallel size 2" in line


@pytest.mark.parametrize(("tp_size", "world_size"), [("2", None), ("1", "2"), ("2", "4")])
def test_cli_tp_must_equal_the_world_size(tmp_path, capsys, monkeypatch, tp_size, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
        monkeypatch.setenv("RANK", "0")
    line = _cli_error(capsys, "--config", _config_file(tmp_path), "--tp", tp_size)
    assert f"error: --tp {tp_size} but the world size is {world_size or 1}" in line, line
    assert f"torchrun --nproc-per-node {tp_size}" in line


def test_cli_tp_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--config", _config_file(tmp_path), "--tp", "0"])
    assert excinfo.value.code == 2
    assert "argument --tp: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_a_missing_rank_is_an_error_not_a_hang(monkeypatch):
    """Rank 0 of 2 alone: the process group does not form, and it says so within the timeout."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(tp_workers.free_port()))
    start = time.monotonic()
    with pytest.raises(ParallelError, match="2 ranks did not form a process group within 2 s"):
        tp.init_distributed(2, timeout_s=2)
    assert time.monotonic() - start < 30
    assert not torch.distributed.is_initialized()


def test_torchrun_two_ranks_only_rank_0_prints(tmp_path):
    """The real launch: torchrun, two processes (gloo on CPU, NCCL on two GPUs); one report,
    from rank 0."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        _two_gpus()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(tp_workers.free_port()), "-m", "engine", "--tp", "2",
            "--config", _config_file(tmp_path), "--dtype", "float32",
            "--prompt-len", "4", "--max-new-tokens", "3",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("decode:") == 1, result.stdout
    assert f"tensor parallel 2 ranks ({backend})" in result.stdout
    assert "not applicable: o_proj_residual, down_proj_residual" in result.stdout


# --------------------------------------------------------------------------------------------
# GPU (two GPUs): NCCL, the symmetric-memory kernel, CUDA graphs under TP
# --------------------------------------------------------------------------------------------


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")


@pytest.mark.gpu
def test_nccl_two_ranks_match_one_process_bf16(tmp_path):
    _two_gpus()
    config = small_config(num_hidden_layers=4)
    prompt = torch.randint(0, config.vocab_size, (2, 8))
    runs = [("tp", "default", False)]
    ranks = tp_workers.run_ranks(
        tp_workers.generate, tmp_path, config, prompt, 6, runs, torch.bfloat16, backend="nccl"
    )
    got = ranks[0]["tp"]
    model = engine.build(config, dtype=torch.bfloat16, device="cuda", flags=_one_process(got))
    ref = _teacher_forced(model, prompt.cuda(), got["tokens"].cuda()).cpu()
    # bf16: the split changes roundings of partial sums; a few percent of the logits' norm
    # (as between fused and unfused steps in bf16).
    assert_logits_close(got["logits"], ref, max_abs=float("inf"), norm_rel=3e-2, what="bf16 TP")


@pytest.mark.gpu
def test_symmetric_memory_kernel_matches_the_float64_reference(tmp_path):
    _two_gpus()
    for dtype in (torch.float32, torch.bfloat16):
        ranks = tp_workers.run_ranks(
            tp_workers.all_reduce_residual_paths, tmp_path / str(dtype), 8, 1024, dtype,
            backend="nccl",
        )  # fmt: skip
        for rank in ranks:
            assert rank["reason"] == "", rank["reason"]
            exact = rank["exact"]
            err = (rank["fused"].double() - exact).abs()
            unfused_err = (rank["unfused"].double() - exact).abs()
            ulp = torch.finfo(dtype).eps * exact.abs()
            assert (err <= unfused_err + ulp + 1e-30).all(), dtype
        assert torch.equal(ranks[0]["fused"], ranks[1]["fused"])  # same bits on every rank


@pytest.mark.gpu
def test_one_barrier_kernel_back_to_back_and_in_a_cuda_graph(tmp_path):
    """Calls at M=1 and M=8 interleaved (different grids), ranks late in turn, a CUDA graph of
    three calls replayed between eager calls: every result within a bf16 ulp of the float64
    sum (a half overwritten while a peer reads it would be off by whole values), the same bits
    on both ranks, and each block's epoch advanced once per call it ran in."""
    _two_gpus()
    ranks = tp_workers.run_ranks(tp_workers.all_reduce_residual_calls, tmp_path, backend="nccl")
    for rank in ranks:
        assert rank["reason"] == "", rank["reason"]
        assert int(rank["calls"]) == 5 * 6 + 4 * 4
        assert (rank["excess"] <= 0).all(), rank["excess"]
        assert torch.equal(rank["epochs_advanced"], rank["blocks_ran"])
        assert rank["blocks_ran"][0] == rank["calls"] and rank["blocks_ran"][2] > 0
        assert (rank["blocks_ran"][1:] < rank["calls"]).all()  # the grids did differ
    assert torch.equal(ranks[0]["fused"], ranks[1]["fused"])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "flags", ["default", "norm_qkv_proj,norm_gate_up_silu,all_reduce_residual"]
)
def test_cuda_graphs_under_tp_replay_the_eager_decode(tmp_path, flags):
    _two_gpus()
    config = small_config(num_hidden_layers=4)
    prompt = torch.randint(0, config.vocab_size, (1, 8))
    ranks = tp_workers.run_ranks(
        tp_workers.cuda_graph_decode, tmp_path, config, prompt, 6, flags, backend="nccl"
    )
    for rank in ranks:
        assert torch.equal(rank["tokens"], rank["eager_tokens"])
        assert torch.equal(rank["graphed"], rank["eager"])
