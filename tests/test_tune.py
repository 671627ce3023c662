"""The tuner's candidate spaces (profiling/tune.py): every fusion kernel with a table has
candidates at decode and prefill sizes, each a valid configuration of its kernel; the table of
the swiglu kernel is keyed by its output width. Tuning itself runs on a GPU."""

from __future__ import annotations

import pytest
import torch

from engine import fusions as registry
from engine.config import default_config
from engine.program import span_ops
from engine.qwen3 import Qwen3ForCausalLM
from profiling import tune


@pytest.fixture(scope="module")
def program():
    with torch.device("meta"):
        return Qwen3ForCausalLM(default_config().replace(num_hidden_layers=1)).program()


@pytest.mark.parametrize("name", [f.name for f in registry.all_fusions()])
@pytest.mark.parametrize("M", [1, 8, 64])
def test_every_tunable_fusion_has_valid_candidates(program, name, M):
    fusion = registry.get(name)
    if not tune.tunable(fusion):
        pytest.skip(f"{fusion.kernel} has no launch table")
    N, K = tune.kernel_shape(fusion, span_ops(program, fusion), default_config())
    candidates = fusion.kernel_module().tuning_candidates(M, N, K)
    assert candidates, (name, M)
    assert len(set(candidates)) == len(candidates)
    assert all(type(c).__name__ == "Config" for c in candidates)
    if M >= 16:
        assert any(c.path == "cublas" for c in candidates)


def test_tables_are_keyed_by_the_kernel_launchers_own_width(program):
    c = default_config()
    shape = {
        f.name: tune.kernel_shape(f, span_ops(program, f), c)
        for f in registry.all_fusions()
        if tune.tunable(f)
    }
    assert shape["o_proj_residual"] == (c.hidden_size, c.num_attention_heads * c.head_dim)
    assert shape["down_proj_residual"] == (c.hidden_size, c.intermediate_size)
    assert shape["norm_qkv_proj"] == (c.qkv_size, c.hidden_size)
    assert shape["norm_gate_up_silu"] == (c.intermediate_size, c.hidden_size)


def test_the_tuner_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the tuner runs")
    assert tune.main(["--fusions", "o_proj_residual"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
