"""The committed launch tables (kernels/configs/<kernel>/<gpu-slug>.json; cold start: nothing
autotunes at run time) and how kernels.tuning reads them. CPU: these read JSON and build
configurations, they launch nothing."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from engine.config import QWEN3_SIZES, qwen3_config
from kernels import linear_residual as lr
from kernels import tuning
from kernels.runtime import gpu_slug

KERNEL = "linear_residual"
TABLES = sorted(tuning.CONFIG_DIR.glob("*/*.json"))
# Qwen3 o_proj (N, K): hidden size x (heads x head_dim).
QWEN3_O_PROJ_SHAPES = {  # o_proj's [N, K] = [hidden, heads * head_dim] per Qwen3 size
    f"qwen3-{size}": (c.hidden_size, c.num_attention_heads * c.head_dim)
    for size in QWEN3_SIZES
    for c in [qwen3_config(size)]
}


def _kernel(path):
    """The kernel module a table belongs to (its folder's name)."""
    return importlib.import_module(f"kernels.{path.parent.name}")


def _tables(kernel=None):
    paths = [p for p in TABLES if kernel in (None, p.parent.name)]
    return pytest.mark.parametrize("path", paths, ids=[f"{p.parent.name}-{p.stem}" for p in paths])


def test_a_table_is_committed():
    assert any(p.parent.name == KERNEL for p in TABLES), f"no table under {tuning.CONFIG_DIR}"
    assert lr.KERNEL == KERNEL


@_tables()
def test_table_names_its_gpu(path):
    table = json.loads(path.read_text())
    kernel = _kernel(path).KERNEL
    assert kernel == path.parent.name
    assert table["gpu_slug"] == path.stem == gpu_slug(table["gpu"])
    assert tuning.table_path(kernel, path.stem) == path
    assert tuning.load_table(kernel, path.stem) == table


@_tables(KERNEL)
def test_committed_table_covers_every_qwen3_shape_from_m_1(path):
    table = json.loads(path.read_text())
    for name, (N, K) in QWEN3_O_PROJ_SHAPES.items():
        by_m = table["configs"][f"{N}x{K}"][tuning.dtype_key(torch.bfloat16)]
        assert "1" in by_m, f"{name}: decode (M=1) has no tuned configuration"
        for bucket in by_m:
            timing = table["timings"][f"{N}x{K}"]["bfloat16"][bucket]
            assert timing["best_us"] > 0 and timing["candidates"] >= 1, (name, bucket)


@_tables()
def test_every_entry_is_a_valid_config(path):
    table = json.loads(path.read_text())
    entries = 0
    for shape, by_dtype in table["configs"].items():
        N, K = (int(v) for v in shape.split("x"))
        assert N >= 1 and K >= 1, shape
        for dtype, by_m in by_dtype.items():
            assert dtype in ("bfloat16", "float16", "float32"), (shape, dtype)
            for bucket, data in by_m.items():
                assert int(bucket) == tuning.m_bucket(int(bucket)), f"{shape}: {bucket}"
                _kernel(path).Config.from_json(data)  # validates; unknown fields refused
                entries += 1
            assert by_m, (shape, dtype)
    assert entries >= 1


@pytest.mark.parametrize(
    "fields",
    [
        {"path": "gemm"},
        {"BLOCK_N": 3},
        {"split_k": 0},
        {"dot": True, "BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 16},
        {"GROUP_M": 8},
        {"tma": True},
    ],
    ids=["path", "block", "split_k", "dot-small", "GROUP_M", "tma"],
)
def test_invalid_config_is_refused(fields):
    with pytest.raises((ValueError, TypeError)):
        lr.Config.from_json({**lr.Config().to_json(), **fields})


@pytest.mark.parametrize(
    ("M", "bucket"),
    [(1, 1), (2, 2), (3, 4), (5, 8), (16, 16), (17, 32), (333, 512), (2048, 2048), (2049, 4096)],
)
def test_m_bucket_is_the_next_power_of_two(M, bucket):
    assert tuning.m_bucket(M) == bucket


@pytest.mark.skipif(not tuning.INTERPRETING, reason="checks the interpreter's behaviour")
@pytest.mark.parametrize("shape", QWEN3_O_PROJ_SHAPES)
def test_no_table_applies_under_the_interpreter(shape, monkeypatch):
    N, K = QWEN3_O_PROJ_SHAPES[shape]
    if TABLES:  # even when this machine is named like a tuned GPU
        monkeypatch.setattr(tuning, "gpu_slug", lambda: TABLES[0].stem)
    for M in (1, 16, 2048):
        assert tuning.tuned(KERNEL, N, K, torch.bfloat16, M) is None
        assert lr.select_config(M, N, K, torch.bfloat16) == lr.heuristic_config(
            M, N, K, torch.bfloat16
        )


@_tables()
def test_tuned_picks_the_bucket_at_or_above_m(path, monkeypatch):
    """What a compiled run on that GPU reads: the bucket of M, else the next larger tuned one;
    beyond the largest, and for an untuned shape or dtype, None: the kernel's heuristic."""
    table = json.loads(path.read_text())
    kernel = _kernel(path)
    monkeypatch.setattr(tuning, "INTERPRETING", False)
    monkeypatch.setattr(tuning, "gpu_slug", lambda: path.stem)
    for shape, by_dtype in table["configs"].items():
        N, K = (int(v) for v in shape.split("x"))
        by_m = by_dtype["bfloat16"]
        buckets = sorted(int(b) for b in by_m)
        for M in (1, 2, 3, 5, 8, 12, 17, 100, 333, 2048, 5000):
            expected = next((b for b in buckets if b >= tuning.m_bucket(M)), None)
            got = tuning.tuned(kernel.KERNEL, N, K, torch.bfloat16, M)
            if expected is None:
                assert got is None, (shape, M)
                assert kernel.select_config(M, N, K, torch.bfloat16) == kernel.heuristic_config(
                    M, N, K, torch.bfloat16
                )
            else:
                assert got == by_m[str(expected)], (shape, M)
                assert kernel.select_config(M, N, K, torch.bfloat16) == kernel.Config.from_json(
                    by_m[str(expected)]
                )
        if "float32" not in by_dtype:
            assert tuning.tuned(kernel.KERNEL, N, K, torch.float32, 1) is None
    assert tuning.tuned(kernel.KERNEL, 77, 333, torch.bfloat16, 1) is None
    assert tuning.load_table(kernel.KERNEL, "no-such-gpu") == {}


def test_a_table_tuned_at_decode_sizes_leaves_prefill_to_the_heuristic(monkeypatch):
    """A shape tuned at M = 1 and 8 only must not run a 2048-row prefill on the M = 8 GEMV."""
    N, K = 1024, 3072
    gemv = lr.Config("gemv", 16, 32, 1024, pdl=True, split_k=3, dot=True)
    table = {
        "configs": {f"{N}x{K}": {"bfloat16": {"1": lr.Config().to_json(), "8": gemv.to_json()}}}
    }
    monkeypatch.setattr(tuning, "INTERPRETING", False)
    monkeypatch.setattr(tuning, "load_table", lambda kernel, slug: table)
    assert lr.select_config(5, N, K, torch.bfloat16) == gemv
    for M in (9, 64, 2048):
        assert tuning.tuned(KERNEL, N, K, torch.bfloat16, M) is None
        assert lr.select_config(M, N, K, torch.bfloat16) == lr.heuristic_config(
            M, N, K, torch.bfloat16
        )
    if not lr.INTERPRETING:  # the heuristic sends prefill sizes to cuBLAS
        assert lr.select_config(2048, N, K, torch.bfloat16).path == "cublas"


def test_use_config_forces_and_restores():
    N, K = QWEN3_O_PROJ_SHAPES["qwen3-0.6b"]
    before = lr.select_config(7, N, K, torch.bfloat16)
    forced = lr.Config("gemv", 4, 32, 128, split_k=2)
    assert forced != before
    with tuning.use_config(KERNEL, forced):
        assert tuning.override(KERNEL) == forced
        assert lr.select_config(7, N, K, torch.bfloat16) == forced
        with tuning.use_config(KERNEL, lr.Config("cublas")):
            assert lr.select_config(7, N, K, torch.bfloat16).path == "cublas"
        assert lr.select_config(7, N, K, torch.bfloat16) == forced
    assert tuning.override(KERNEL) is None
    assert lr.select_config(7, N, K, torch.bfloat16) == before


@pytest.mark.parametrize("rows", [1, 4])
def test_the_reported_path_is_the_one_the_fused_call_chooses(rows, device):
    """profiling.kernel_timing.fused_path (the "path" of the bench and the report) asks each
    two-path kernel's select_config exactly what the fused call asks it, and returns its
    answer; one-path kernels report "triton". Checked by recording select_config's arguments
    in a real fused call (interpreted on CPU, compiled on a GPU)."""
    import importlib

    from engine import fusions as registry
    from engine.program import call_fused, draw_inputs, span_ops
    from engine.qwen3 import Qwen3ForCausalLM
    from profiling.kernel_timing import fused_path

    config = qwen3_config("0.6b").replace(num_hidden_layers=1)
    with torch.device("meta"):
        program = Qwen3ForCausalLM(config).program()
    generator = torch.Generator(device=device).manual_seed(rows)
    for fusion in registry.all_fusions():
        ops = span_ops(program, fusion)
        inputs = draw_inputs(ops, config, rows, torch.float32, device, generator)
        kernel = importlib.import_module(f"kernels.{fusion.kernel}")
        select = getattr(kernel, "select_config", None)
        if select is None:
            assert fused_path(fusion, inputs, rows) == "triton", fusion.name
            continue
        asked = []

        def spy(*args, select=select, asked=asked):
            asked.append(args)
            return select(*args)

        kernel.select_config = spy
        try:
            call_fused(
                fusion, ops, {k: getattr(v, "clone", lambda v=v: v)() for k, v in inputs.items()}
            )
            called = list(asked)
            asked.clear()
            path = fused_path(fusion, inputs, rows)
        finally:
            kernel.select_config = select
        assert called and asked == called[:1], (fusion.name, asked, called)
        assert path == select(*called[0]).path, fusion.name
