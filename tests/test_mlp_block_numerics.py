"""The MLP-block kernel (kernels/mlp_block.py): the whole block in one launch and each stage
alone vs float64 and the unfused torch ops; its grid barrier resets itself, and a barrier that
never opens gives NaN and a flag, never a hang."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES, assert_close_to_reference, swiglu_magnitude

from kernels import mlp_block as module
from kernels.mlp_block import (
    MAX_ROWS,
    barrier_failed,
    mlp_block,
    mlp_block_down,
    mlp_block_float64,
    mlp_block_gate_up,
    mlp_block_reference,
    reset_barrier,
)
from kernels.rms_norm_swiglu import rms_norm_swiglu_float64, rms_norm_swiglu_reference

EPS = 1e-6
# Ragged on purpose: no power of two, no multiple of a tile.
INTER, K = 50, 96


def _inputs(lead, i, k, dtype, device):
    """Model-scale values (never zeros): activations ~N(0, 1), weights ~N(0, 0.02), norm
    weights away from 1."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    residual = torch.randn(*lead, k, device=device).to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(k, device=device)).to(dtype)
    gate_up_weight = (0.02 * torch.randn(2 * i, k, device=device)).to(dtype)
    down_proj_weight = (0.02 * torch.randn(k, i, device=device)).to(dtype)
    return residual, norm_weight, gate_up_weight, down_proj_weight


def _magnitude(residual, norm_weight, gate_up_weight, down_proj_weight):
    """Ulps are counted at |residual| + sum |act terms| of the down projection (float64)."""
    act = rms_norm_swiglu_float64(residual, norm_weight, gate_up_weight, EPS)
    return residual.double().abs() + act.abs() @ down_proj_weight.double().abs().T


def _check_block(residual, norm_weight, gate_up_weight, down_proj_weight, what):
    expected = mlp_block_float64(residual, norm_weight, gate_up_weight, down_proj_weight, EPS)
    reference = mlp_block_reference(residual, norm_weight, gate_up_weight, down_proj_weight, EPS)
    got = residual.clone()
    assert mlp_block(got, norm_weight, gate_up_weight, down_proj_weight, EPS) is got  # in place
    assert_close_to_reference(
        got,
        reference,
        expected,
        what=what,
        magnitude=_magnitude(residual, norm_weight, gate_up_weight, down_proj_weight),
    )
    return got


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8, MAX_ROWS, MAX_ROWS + 4])
def test_rows(M, dtype_name, device):
    """Decode sizes run the one-launch kernel; more rows the two kernels it replaces."""
    inputs = _inputs(M, INTER, K, DTYPES[dtype_name], device)
    _check_block(*inputs, f"mlp_block M={M} I={INTER} K={K} {dtype_name}")


@pytest.mark.parametrize("M", [1, 8])
def test_qwen3_0_6b_shape(M, device):
    # Qwen3-0.6B: hidden 1024, intermediate 3072.
    inputs = _inputs(M, 3072, 1024, torch.bfloat16, device)
    _check_block(*inputs, f"mlp_block Qwen3-0.6B M={M} bf16")


def test_leading_dims_and_strided_weights(device):
    residual, norm_weight, _, _ = _inputs((2, 3), INTER, K, torch.float32, device)
    gate_up_t = (0.02 * torch.randn(K, 2 * INTER, device=device)).t()  # K-stride 2I
    down_t = (0.02 * torch.randn(INTER, K, device=device)).t()
    _check_block(residual, norm_weight, gate_up_t, down_t, "mlp_block [2, 3, K], transposed W")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_each_stage_alone(dtype_name, device):
    """The same kernel launched for one stage: stage 0 against RMSNorm + gate/up + SiLU*up,
    stage 1 against the down projection + residual add, each on its own fresh inputs."""
    dtype = DTYPES[dtype_name]
    residual, norm_weight, gate_up_weight, down_proj_weight = _inputs(4, INTER, K, dtype, device)
    act = mlp_block_gate_up(residual, norm_weight, gate_up_weight, EPS)
    assert_close_to_reference(
        act,
        rms_norm_swiglu_reference(residual, norm_weight, gate_up_weight, EPS),
        rms_norm_swiglu_float64(residual, norm_weight, gate_up_weight, EPS),
        what=f"mlp_block stage gate_up {dtype_name}",
        magnitude=swiglu_magnitude(residual, norm_weight, gate_up_weight, EPS),
    )
    x = torch.randn(4, INTER, device=device).to(dtype)  # fresh: not stage 0's output
    got = residual.clone()
    assert mlp_block_down(x, got, down_proj_weight) is got
    assert_close_to_reference(
        got,
        residual + torch.nn.functional.linear(x, down_proj_weight),
        residual.double() + x.double() @ down_proj_weight.double().T,
        what=f"mlp_block stage down {dtype_name}",
        magnitude=residual.double().abs() + x.double().abs() @ down_proj_weight.double().abs().T,
    )


def test_a_wrong_stage_fails_the_check(device):
    """The comparison can fail: gate and up swapped in the weight."""
    residual, norm_weight, gate_up_weight, down_proj_weight = _inputs(
        3, INTER, K, torch.float32, device
    )
    swapped = torch.cat(gate_up_weight.chunk(2)[::-1])
    got = residual.clone()
    mlp_block(got, norm_weight, swapped, down_proj_weight, EPS)
    with pytest.raises(AssertionError, match="elements off by more than"):
        assert_close_to_reference(
            got,
            mlp_block_reference(residual, norm_weight, gate_up_weight, down_proj_weight, EPS),
            mlp_block_float64(residual, norm_weight, gate_up_weight, down_proj_weight, EPS),
            what="planted: gate and up swapped",
        )


@pytest.mark.parametrize(
    "config",
    [
        module.Config(programs=3, BLOCK_M=4, BLOCK_N0=8, BLOCK_K0=32, BLOCK_N1=16, BLOCK_K1=16),
        module.Config(programs=1, BLOCK_M=4, BLOCK_N0=64, BLOCK_K0=128, BLOCK_N1=128, BLOCK_K1=64),
    ],
    ids=["many-tiles-and-chunks", "one-tile-one-chunk"],
)
def test_forced_configurations(config, device):
    """Any tiling is the same formula: several tiles a program, several chunks a tile (the
    loops and the weights loaded one tile ahead), or one of each. On CPU a grid of more than
    one program would wait forever at the barrier: each stage is launched alone there."""
    from kernels import tuning

    residual, norm_weight, gate_up_weight, down_proj_weight = _inputs(
        3, INTER, K, torch.float32, device
    )
    expected = mlp_block_float64(residual, norm_weight, gate_up_weight, down_proj_weight, EPS)
    reference = mlp_block_reference(residual, norm_weight, gate_up_weight, down_proj_weight, EPS)
    with tuning.use_config(module.KERNEL, config):
        got = residual.clone()
        if config.programs == 1 or device.type == "cuda":
            mlp_block(got, norm_weight, gate_up_weight, down_proj_weight, EPS)
        else:
            act = mlp_block_gate_up(residual, norm_weight, gate_up_weight, EPS)
            mlp_block_down(act, got, down_proj_weight)
    assert_close_to_reference(got, reference, expected, what=f"mlp_block {config}")


def _sync(device):
    return module._sync_buffer(device)


def test_the_barrier_resets_itself(device):
    """Each one-launch call passes one barrier: the generation advances by one, every program
    arrived (the count is back at zero), nothing failed."""
    inputs = _inputs(2, INTER, K, torch.float32, device)
    mlp_block(inputs[0].clone(), *inputs[1:], EPS)
    before = _sync(device).clone()
    for _ in range(3):
        mlp_block(inputs[0].clone(), *inputs[1:], EPS)
    after = _sync(device).cpu()
    assert int(after[1]) - int(before[1].cpu()) == 3
    assert int(after[0]) == 0 and int(after[2]) == 0
    assert not barrier_failed(device)


def test_a_barrier_that_never_opens_gives_nan_and_a_flag(device, monkeypatch):
    """An arrival count off by one (as another launch sharing the buffer would leave it): no
    program is the last to arrive, each gives up after SPIN_LIMIT polls, the output is NaN and
    the failure sticks (NaN again) until reset_barrier."""
    monkeypatch.setattr(module, "SPIN_LIMIT", 64)
    inputs = _inputs(2, INTER, K, torch.float32, device)
    sync = _sync(device)
    sync[0] = -1
    try:
        out = mlp_block(inputs[0].clone(), *inputs[1:], EPS)
        assert torch.isnan(out).all()
        assert barrier_failed(device)
        again = mlp_block(inputs[0].clone(), *inputs[1:], EPS)
        assert torch.isnan(again).all()
    finally:
        reset_barrier(device)
    assert not barrier_failed(device)
    _check_block(*inputs, "mlp_block after reset_barrier")


def test_bad_inputs_name_the_argument(device):
    residual, norm_weight, gate_up_weight, down_proj_weight = _inputs(
        2, INTER, K, torch.float32, device
    )
    with pytest.raises(ValueError, match=r"down_proj_weight has shape \(50, 96\); expected"):
        mlp_block(residual, norm_weight, gate_up_weight, down_proj_weight.T, EPS)
    with pytest.raises(TypeError, match="down_proj_weight has dtype"):
        mlp_block(residual, norm_weight, gate_up_weight, down_proj_weight.half(), EPS)
    with pytest.raises(ValueError, match="gate_up_weight has 99 rows, an odd number"):
        mlp_block(residual, norm_weight, gate_up_weight[:99], down_proj_weight, EPS)
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        mlp_block(residual, norm_weight, gate_up_weight, down_proj_weight, 0.0)
    with pytest.raises(ValueError, match=r"residual has shape \(2, 64\) but gate_up_weight"):
        mlp_block(residual[:, :64], norm_weight, gate_up_weight, down_proj_weight, EPS)
    unflattenable = torch.randn(3, 2, K, device=device).transpose(0, 1)
    with pytest.raises(ValueError, match="residual with shape .* cannot be viewed"):
        mlp_block(unflattenable, norm_weight, gate_up_weight, down_proj_weight, EPS)


@pytest.mark.gpu
def test_stage_times_cover_the_kernel(device):
    """The in-kernel stamps: every program's four readings in order, every stage's time
    positive, and the stages' sum (the span from the first stamp to the last) within the
    kernel's own duration as the profiler measures it, and at least half of it. The report
    prints the same comparison per decode step."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        pytest.skip("the stamps are read from the GPU's %globaltimer")
    inputs = _inputs(1, 3072, 1024, torch.bfloat16, device)
    residual = inputs[0].clone()
    for _ in range(3):
        mlp_block(residual, *inputs[1:], EPS)
    torch.cuda.synchronize()
    with (
        module.recording_stage_times() as calls,
        profile(activities=[ProfilerActivity.CUDA]) as prof,
    ):
        for _ in range(5):
            mlp_block(residual, *inputs[1:], EPS)
        torch.cuda.synchronize()
    assert len(calls) == 5
    sums = []
    for stamps in calls:
        assert (stamps[:, 1:] >= stamps[:, :-1]).all() and (stamps[:, 0] > 0).all()
        times = module.stage_times_us(stamps)
        assert set(times) == set(module.STAGES) and all(t > 0 for t in times.values())
        sums.append(sum(times.values()))
    (kernel,) = [e for e in prof.key_averages() if "_mlp_block_kernel" in e.key]
    kernel_us = kernel.device_time_total / kernel.count
    assert 0.5 * kernel_us <= sum(sums) / len(sums) <= 1.01 * kernel_us, (sums, kernel_us)
