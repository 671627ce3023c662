"""Decode throughput (D5). GPU: pytest-benchmark benchmarks of decode, fused and unfused,
eager and CUDA graph, on the embedded default (Qwen3-0.6B architecture, random weights).
CPU: the measuring code end to end on a 2-layer model through the interpreter (its numbers
mean nothing; what is checked is what gets measured and reported)."""

from __future__ import annotations

import math

import pytest
import torch

from profiling.launches import random_prompt
from profiling.throughput import (
    Mode,
    Settings,
    ThroughputResult,
    fusion,
    make_runner,
    measure_mode,
    report_json,
    time_decode,
)


def test_settings_need_five_repeats_and_a_warm_up():
    with pytest.raises(ValueError, match="repeats must be >= 5"):
        Settings(repeats=4)
    with pytest.raises(ValueError, match="warmup"):
        Settings(warmup=0)


def test_result_statistics_are_those_of_the_repeats():
    result = ThroughputResult(Mode(True, False), [100.0, 110.0, 90.0, 105.0, 95.0])
    assert result.median == 100.0
    assert result.spread == pytest.approx(0.2)
    assert result.mad_rel == pytest.approx(0.05)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="checks the interpreter run on CPU tensors; on a GPU the gpu-marked tests measure",
)
def test_measure_on_the_interpreter_end_to_end():
    import engine
    from profiling.__main__ import small_config

    model = engine.build(small_config(), dtype=torch.float32, device="cpu")
    settings = Settings(prompt_len=3, new_tokens=2, repeats=5, warmup=1)
    results = [measure_mode(model, Mode(fused, False), settings) for fused in (True, False)]
    assert model.flags.fuse_o_proj_residual is True  # restored after the unfused mode
    for r in results:
        assert len(r.tokens_per_s) == settings.repeats
        assert all(math.isfinite(x) and x > 0 for x in r.tokens_per_s)
        assert r.launches is None and "no CUDA" in r.launches_error
    report = report_json(results, model, settings)
    entry = report["modes"]["eager-b1"]
    assert entry["speedup"] == pytest.approx(
        entry["fused"]["tok_s_median"] / entry["unfused"]["tok_s_median"]
    )
    assert report["config"]["num_hidden_layers"] == 2
    assert report["settings"]["new_tokens"] == 2
    assert report["gpu"] and report["torch"] == torch.__version__
    with pytest.raises(ValueError, match="needs a CUDA model"):
        measure_mode(model, Mode(True, True), settings)


# --------------------------------------------------------------------------------------------
# GPU benchmarks
# --------------------------------------------------------------------------------------------

BENCH_SETTINGS = Settings()


@pytest.fixture(scope="module")
def default_model():
    from profiling.gate import default_model

    return default_model()


@pytest.mark.gpu
@pytest.mark.bench
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_decode_throughput(benchmark, default_model, fused, graph):
    """One round = BENCH_SETTINGS.new_tokens decode steps after an untimed prefill."""
    mode = Mode(fused, graph)
    s = BENCH_SETTINGS
    with fusion(default_model, fused):
        runner = make_runner(default_model, mode, s)
        time_decode(runner, 1, s)  # warm-up, and the CUDA-graph capture
        prompt = random_prompt(runner, 1, s.prompt_len)
        state = {}

        def prefill():
            state["token"] = runner.prefill(prompt).argmax(-1)
            torch.cuda.synchronize()

        def decode():
            token = state["token"]
            for _ in range(s.new_tokens):
                token = runner.decode(token).argmax(-1)
            torch.cuda.synchronize()

        with torch.inference_mode():
            benchmark.pedantic(decode, setup=prefill, rounds=s.repeats + 2, warmup_rounds=1)
    benchmark.group = f"decode {mode.key} (Qwen3-0.6B arch, {s.new_tokens} tokens)"
    benchmark.extra_info.update(
        mode=str(mode),
        new_tokens=s.new_tokens,
        prompt_len=s.prompt_len,
        tok_s_median=s.new_tokens / benchmark.stats["median"],
    )
