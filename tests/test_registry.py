"""The fusion registry drives every stage: a toy fusion registered here (a scaled residual add
in one Triton launch, replacing the attention residual add) is run by the engine, checked by
the numerics rule, counted by the launch counter, timed, gated and reported, with no other
edit. Also: alternatives are refused with a clear error, every declaration fits the program."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_logits_close, small_config
from gate_helpers import small_model, synthetic_report
from toy_kernel import scaled_add

import engine
from engine import fusions as registry
from engine.flags import FusionFlags
from engine.program import Fusion, ProgramError, segments, span_instances
from profiling import measure, report, throughput
from profiling.baselines import make_baseline
from profiling.gate import compare
from profiling.numerics import check_fusion

# --------------------------------------------------------------------------------------------
# The toy: the kernel of tests/toy_kernel.py, one declaration, registered here for each test
# (tests/test_add_a_fusion.py follows docs/add-a-fusion.md step by step with the same kernel)
# --------------------------------------------------------------------------------------------


TOY = Fusion(
    "toy_residual_add",
    spans=(("attn_residual_add",),),
    fused=lambda residual, o: scaled_add(residual, o),
    outputs=("residual",),
    kernel="toy",
    kernel_names=("_scaled_add_kernel",),
    default=False,
    doc="the attention residual add as one Triton kernel (a test's toy)",
)


@pytest.fixture
def toy():
    with registry.registered(TOY):
        yield TOY


# --------------------------------------------------------------------------------------------


def test_every_declaration_fits_the_program_of_every_flag_setting():
    model = engine.build(small_config(num_hidden_layers=3), dtype=torch.float32, device="cpu")
    program = model.program()
    for f in registry.all_fusions():
        assert len(span_instances(program, f)) == 3, f.name  # one instance per layer
    for variant in throughput.variants_and_pairings()[0]:
        model.flags = variant.flags()
        segs = model.segments()  # raises ProgramError on a declaration that does not fit
        assert {s.name for s in segs if s.fusion} == set(variant.fusions)


def test_alternatives_are_computed_and_refused_with_a_clear_error():
    add_norm = registry.get("add_rms_norm")
    assert {f.name for f in registry.all_fusions() if f.conflicts_with(add_norm)} == {
        "norm_qkv_proj",
        "down_proj_residual",
        "mlp_block",
    }
    flags = FusionFlags.default()
    with pytest.raises(ValueError, match="add_rms_norm and down_proj_residual are alternatives"):
        flags.add_rms_norm = True
    assert flags == FusionFlags.default()  # refused changes leave the flags as they were
    flags.set(add_rms_norm=True, down_proj_residual=False, norm_qkv_proj=False)
    assert flags.add_rms_norm and not flags.down_proj_residual


def test_variants_of_one_fusion_parse_as_the_suite_measures_them():
    """default-f, alt+f, alt-f from the command line: the same flags as the suite's variants
    of those names (profiling.throughput), and a clear error for the wrong kind of fusion."""
    variants = {v.name: v for v in throughput.variants_and_pairings()[0]}
    for name in ("default-o_proj_residual", "alt+mlp_block", "alt-mlp_block", "alt+add_rms_norm"):
        assert FusionFlags.parse(name) == variants[name].flags(), name
    assert FusionFlags.parse("alt+mlp_block").mlp_block
    with pytest.raises(ValueError, match="mlp_block is not a default fusion .use alt"):
        FusionFlags.parse("default-mlp_block")
    with pytest.raises(ValueError, match="o_proj_residual is a default fusion"):
        FusionFlags.parse("alt+o_proj_residual")
    with pytest.raises(ValueError, match="unknown fusion 'nope'"):
        FusionFlags.parse("alt+nope")


def test_unknown_fusion_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="unknown fusion 'o_proj'; registered: o_proj_residual"):
        FusionFlags.parse("o_proj")
    with pytest.raises(TypeError, match="True or False"):
        FusionFlags().set(o_proj_residual=1)


def test_a_declaration_that_does_not_fit_is_refused():
    wrong = Fusion(
        "wrong",
        spans=(("o_proj", "attn_residual_add"),),
        fused=lambda attn, residual, o_proj_weight: residual,
        outputs=("o",),  # the span's live output is the residual, not o
        kernel="x",
        kernel_names=("x",),
        doc="",
    )
    model = small_model()
    with pytest.raises(ProgramError, match="'wrong'.*reads \\['residual'\\]"):
        segments(model.program(), [wrong], model.config, returns=("logits",))


def test_the_toy_is_run_by_the_engine(toy, device):
    model = engine.build(small_config(num_hidden_layers=2), dtype=torch.float32, device=device)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), device=device)
    model.flags = FusionFlags.none()
    reference = engine.Runner(model, max_seq_len=16).prefill(prompt)
    model.flags = FusionFlags([toy.name])
    assert [s.name for s in model.segments()].count(toy.name) == 2
    got = engine.Runner(model, max_seq_len=16).prefill(prompt)
    assert_logits_close(got, reference, max_abs=1e-5, norm_rel=1e-5, what="toy vs unfused")
    with pytest.raises(ValueError, match="o_proj_residual and toy_residual_add are alternatives"):
        FusionFlags.parse("toy_residual_add,o_proj_residual")


def test_the_toy_is_checked_by_the_numerics_rule(toy, device, monkeypatch):
    model = small_model()
    for dtype in (torch.float32, torch.bfloat16):
        results = check_fusion(toy, model.program(), model.config, 4, dtype, device)
        assert [r.name for r in results] == ["toy_residual_add.residual"]
        assert all(r.ok for r in results), [r.summary() for r in results]
    broken = Fusion(**{**toy.__dict__, "fused": lambda residual, o: scaled_add(residual, o, 1.01)})
    bad = check_fusion(broken, model.program(), model.config, 4, torch.float32, device)
    assert not bad[0].ok


def test_the_toy_is_counted_timed_gated_and_reported(toy):
    """Every stage's plan includes the toy, with no edit outside this file."""
    model = small_model()
    info = measure.model_summary(model)
    assert info["fusions"][toy.name] == {
        "spans": [["attn_residual_add"]],
        "kernel": "toy",
        "default": False,
        "instances_per_step": model.config.num_hidden_layers,
        "fused_kernels": 1,
        "span_ops": 1,
        "alternatives": ["o_proj_residual"],
    }
    assert toy.name in measure.segment_names(model)
    variants, pairings = throughput.variants_and_pairings()
    assert f"alt+{toy.name}" in {v.name for v in variants}
    assert f"alt+{toy.name}" in {v.name for v in measure.launch_variants()}
    assert any(p.name == toy.name for p in pairings)

    baseline = make_baseline(synthetic_report(seed=1, model=model))
    assert f"{toy.name}/m1/unfused" in baseline["kernel_ratios"]
    assert toy.name in baseline["e2e"]["b1"]["speedups"]
    assert f"alt+{toy.name}/graph-b1" in baseline["launches"]
    result = compare(synthetic_report(seed=2, model=model), baseline)
    assert result.ok, result.summary()
    slower = compare(synthetic_report(seed=2, model=model, ratio_scale={toy.name: 1.05}), baseline)
    assert {c.key.split("/")[0] for c in slower.failures} == {toy.name}
    extra = compare(synthetic_report(seed=3, model=model, extra_kernels={toy.name: 1}), baseline)
    assert any(toy.name in c.key for c in extra.failures)

    current = synthetic_report(seed=4, model=model)
    text = report.launches_table(current, baseline)
    assert toy.name in text
    assert toy.name in report.ratios_table(current, baseline)
    assert toy.name in report.e2e_table(current, baseline)


# --------------------------------------------------------------------------------------------
# Spans over the ops that read the step context and the KV cache
# --------------------------------------------------------------------------------------------


def _ops(names):
    model = small_model(layers=1)
    return model, [model.ops[n] for n in names]


@pytest.mark.parametrize("rows", [1, 3])
def test_the_cache_ops_float64_formulas_match_their_kernels(rows, device):
    """q/k norm + RoPE + cache write, then decode attention, on drawn inputs (a step context
    and caches of their own): the float64 formulas give what the kernels give in float32, for
    the output and for the rows written to the caches."""
    from engine.program import draw_inputs, run_float64, run_unfused

    model, ops = _ops(("qk_norm_rope", "attention"))
    generator = torch.Generator(device=device).manual_seed(int(torch.randint(1000, ())))
    inputs = draw_inputs(ops, model.config, rows, torch.float32, device, generator)
    ctx = inputs["ctx"]
    assert ctx.batch_size == rows and int(ctx.positions.min()) >= 1
    exact = run_float64(ops, inputs)
    got = run_unfused(ops, {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
    for name in ("attn", "qkv", "k_cache", "v_cache"):
        torch.testing.assert_close(got[name].double(), exact[name], rtol=1e-5, atol=1e-5)
    # The new rows were written: the caches differ from their draw at each position.
    seq, pos = torch.arange(rows), ctx.positions.long().cpu()
    assert not torch.equal(
        exact["k_cache"][seq, :, pos].cpu(), inputs["k_cache"][seq, :, pos].double().cpu()
    )


def test_a_fusion_may_span_the_cache_ops_and_is_checked_by_the_numerics_rule(device):
    """A toy fusion over (qk_norm_rope, attention) (the two kernels called back to back) passes
    the numerics rule; the same with its output scaled by 1.01 fails it."""
    from engine.program import run_unfused

    model, ops = _ops(("qk_norm_rope", "attention"))

    def fused(scale):
        return lambda **inputs: run_unfused(ops, inputs)["attn"] * scale

    toy = Fusion(
        "toy_qk_attention",
        spans=(("qk_norm_rope", "attention"),),
        fused=fused(1.0),
        outputs=("attn",),
        kernel="toy",
        kernel_names=("_qk_norm_rope_kernel", "_decode_attention_kernel"),
        default=False,
        doc="q/k norm + RoPE + cache write, then attention (a test's toy)",
    )
    program = model.program()
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 4):
            (result,) = check_fusion(toy, program, model.config, rows, dtype, device)
            assert result.ok, result.failures
    planted = Fusion(**{**toy.__dict__, "fused": fused(1.01)})
    (bad,) = check_fusion(planted, program, model.config, 4, torch.float32, device)
    assert not bad.ok
