"""The committed launch tables (cold start: nothing autotunes at run time) and the tuner's
candidate space. CPU: these read JSON and build configurations, they launch nothing."""

from __future__ import annotations

import json

import pytest

from kernels.fused_attn_output import CONFIG_DIR, KernelConfig, m_bucket
from kernels.tune import M_BUCKETS, QWEN3_O_PROJ_SHAPES, candidates

TABLES = sorted(CONFIG_DIR.glob("*.json"))


def test_a_table_is_committed():
    assert TABLES, f"no tuned launch table under {CONFIG_DIR}"


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_committed_table_covers_every_qwen3_shape_from_m_1(path):
    table = json.loads(path.read_text())
    assert table["gpu_slug"] == path.stem
    for name, (N, K) in QWEN3_O_PROJ_SHAPES.items():
        by_m = table["configs"][f"{N}x{K}"]["bfloat16"]
        assert "1" in by_m, f"{name}: decode (M=1) has no tuned configuration"
        for bucket, data in by_m.items():
            assert int(bucket) == m_bucket(int(bucket)), f"{name}: {bucket} is not a bucket"
            config = KernelConfig.from_json(data)  # validates
            timing = table["timings"][f"{N}x{K}"]["bfloat16"][bucket]
            assert timing["best_us"] > 0 and timing["candidates"] >= 1, (name, bucket, config)


@pytest.mark.parametrize("shape", QWEN3_O_PROJ_SHAPES)
@pytest.mark.parametrize("M", M_BUCKETS)
def test_tuner_has_candidates_for_every_bucket(shape, M):
    N, K = QWEN3_O_PROJ_SHAPES[shape]
    found = candidates(M, N, K)
    assert found, f"no candidates for M={M} {shape}"
    for config in found:
        if config.path == "gemv":  # whole rows of the output tile stay within one program
            assert config.BLOCK_M >= M or config.dot, config
        assert config.pdl, config  # PDL is toggled off on the winner, not here
