"""Every kernel of the decode step has a kernel-time figure: a fusion against its unfused ops
and peers, an op the step runs alone (attention, q/k norm + RoPE, the embedding, the final
norm, lm_head) against a copy of the bytes it must move, on the inputs a real decode step
gave it.

CPU: which ops run alone; their recorded inputs are those of a live decode step (the step
replayed from them gives the model's logits). GPU (timing): the kernel-ratio stage times every
segment of the default step; an op made twice as slow shows it in its ratio.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_helpers import small_config

import engine
from engine.flags import FusionFlags
from profiling import measure
from profiling.kernel_timing import (
    REFERENCE_COPY,
    step_op_inputs,
    step_op_names,
    time_step_op,
)


def _alone(model) -> list[str]:
    """The program's op names no enabled fusion covers, first place first."""
    covered = set().union(*(f.ops for f in model.flags.fusions()))
    return list(dict.fromkeys(b.op.name for b in model.program() if b.op.name not in covered))


@pytest.mark.parametrize("flags", ["default", "none"])
def test_the_ops_timed_alone_are_those_no_enabled_fusion_covers(flags):
    model = engine.build(small_config(num_hidden_layers=2), dtype=torch.float32, device="cpu")
    model.flags = FusionFlags.default() if flags == "default" else FusionFlags.none()
    names = step_op_names(model)
    assert names == _alone(model)
    assert {"attention", "qk_norm_rope", "lm_head", "embed"} <= set(names)
    if flags == "none":
        assert set(names) == set(model.ops)


def test_recorded_inputs_are_a_live_decode_step():
    layers, rows, context_len = 3, 2, 5
    model = engine.build(
        small_config(num_hidden_layers=layers), dtype=torch.float32, device="cpu", seed=11
    )
    inputs = step_op_inputs(model, rows, context_len, seed=int(torch.randint(1000, ())))
    assert [len(inputs[n]) for n in ("attention", "qk_norm_rope")] == [layers, layers]
    assert len(inputs["lm_head"]) == len(inputs["embed"]) == 1
    for i, recorded in enumerate(inputs["attention"]):
        attn = model.model.layers[i].self_attn
        assert recorded["k_cache"] is attn.k_cache and recorded["v_cache"] is attn.v_cache
        assert recorded["ctx"].positions.tolist() == [context_len] * rows
        # the prompt's keys are in the cache (the prefill wrote them)
        assert attn.k_cache[:rows, :, :context_len].abs().amin(dim=-1).gt(0).all()
    # The whole step again from the recorded ids and context: its logits are what lm_head
    # gives on its recorded input.
    ids, ctx = inputs["embed"][0]["ids"], inputs["attention"][0]["ctx"]
    with torch.no_grad():
        logits = model(ids, ctx)
        again = model.ops["lm_head"].fn(**inputs["lm_head"][0])
    assert logits.shape == (rows, model.config.vocab_size)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# GPU (timing: serial, never in xdist workers)
# --------------------------------------------------------------------------------------------

PLAN = measure.Plan(kernel_rows=(1,), kernel_rounds=5)


@pytest.mark.gpu
@pytest.mark.timing
def test_every_segment_of_the_default_step_gets_a_kernel_ratio():
    model = engine.build(dtype=torch.bfloat16)
    ratios = measure.measure_kernel_ratios(model, PLAN)
    for segment in model.segments():
        keys = [k for k in ratios if k.startswith(f"{segment.name}/m1/")]
        assert keys, f"no kernel ratio for {segment.name}"
        assert all(ratios[k]["ratio"] > 0 and ratios[k]["fused_us"] > 0 for k in keys)
    for name in step_op_names(model):
        assert f"{name}/m1/{REFERENCE_COPY}" in ratios


@pytest.mark.gpu
@pytest.mark.timing
@pytest.mark.parametrize("op", ["attention", "qk_norm_rope"])
def test_an_op_run_twice_shows_in_its_ratio(op):
    model = engine.build(dtype=torch.bfloat16)
    context_len = PLAN.prompt_len + PLAN.new_tokens // 2
    inputs = step_op_inputs(model, 1, context_len)[op]
    once = time_step_op(model, op, inputs, 1, context_len, rounds=5).ratio(REFERENCE_COPY)
    original = model.ops[op]

    def twice(**kw):
        original.fn(**kw)
        return original.fn(**kw)

    model.ops[op] = dataclasses.replace(original, fn=twice)
    slow = time_step_op(model, op, inputs, 1, context_len, rounds=5).ratio(REFERENCE_COPY)
    assert slow > 1.5 * once, (once, slow)
