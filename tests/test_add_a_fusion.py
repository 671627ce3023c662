"""docs/add-a-fusion.md, step by step, on CPU, with a toy fusion (the attention residual add as
one scaled-add Triton kernel) and no edit to any other file: the kernel file, its declaration
in the real registry, its numerics test; then the suite's stages as the gate runs them, launch
counting on a CPU trace, the report, and a baseline written on CPU (in tmp_path) that gates
it. Before that baseline is written, the committed baselines report the toy "not yet
baselined" (the GPU gate exits 3 for it with that message) and CPU CI stays green."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import small_config
from gate_helpers import H100, LAYERS, PLAN, synthetic_report

import engine
from engine import fusions as registry
from engine.flags import FusionFlags
from engine.program import Fusion, span_instances
from engine.qwen3 import Qwen3ForCausalLM, on_meta
from engine.runner import Runner
from profiling import baselines, breakdown, gate, measure, report
from profiling.launches import record_decode_trace
from profiling.numerics import check_fusion
from profiling.ranks import Ranks

NAME = "toy_scaled_residual_add"
# The walk through the suite's stages runs a CPU model (kernels interpreted); on a GPU runner,
# where kernels run compiled on CUDA tensors, the same stages run for the registered fusions.
on_cpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the document's CPU walk: kernels interpreted on CPU tensors"
)

# Step 2: the kernel file, scaled_add.py in kernels/ (tests/toy_kernel.py, written to tmp_path
# and imported under that name: the test edits nothing in the tree).
KERNEL_FILE = (Path(__file__).parent / "toy_kernel.py").read_text()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "scaled_add.py"
    path.write_text(KERNEL_FILE)
    spec = importlib.util.spec_from_file_location("kernels.scaled_add", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def toy(kernel):
    """Step 3: the declaration, registered in the real registry for this module's tests."""
    fusion = Fusion(
        NAME,
        spans=(("attn_residual_add",),),
        fused=lambda residual, o: kernel.scaled_add(residual, o),
        outputs=("residual",),
        kernel="scaled_add",
        kernel_names=("_scaled_add_kernel",),
        default=False,  # an alternative to o_proj_residual, which is on by default
        doc="the attention residual add as one Triton kernel (the add-a-fusion toy)",
    )
    with registry.registered(fusion):
        yield fusion


@pytest.fixture(scope="module")
def model(toy):
    """The gate's model is bf16 (its whole-engine check holds it to an fp32 copy)."""
    return engine.build(small_config(num_hidden_layers=LAYERS), dtype=torch.bfloat16, device="cpu")


@pytest.fixture(scope="module")
def run(model):
    """Step 5: the gate's stages as they run on CPU (numerics; the rest needs a GPU)."""
    current = measure.report_header(model, PLAN)
    gate.run_stages(model, PLAN, current, seed=0, log=lambda line: None, ranks=Ranks.single())
    return current


def test_1_the_span_is_a_run_of_the_program(toy, model):
    program = model.program()
    assert "attn_residual_add" in [b.op.name for b in program]
    assert len(span_instances(program, toy)) == model.config.num_hidden_layers


def test_2_the_kernel_file_is_found_from_the_declaration(toy, kernel, device):
    assert toy.kernel_module() is kernel
    g = torch.Generator(device=device).manual_seed(11)
    r, o = (torch.randn(3, 257, generator=g, device=device) for _ in range(2))
    got = kernel.scaled_add(r, o, 0.5)
    torch.testing.assert_close(got.double(), kernel.scaled_add_float64(r, o, 0.5))
    with pytest.raises(ValueError, match=r"o has shape \(3, 256\)"):
        kernel.scaled_add(r, o[:, :256])


def test_3_the_declaration_is_in_the_registry_and_the_engine_runs_it(toy, model):
    assert registry.get(NAME) is toy
    assert {f.name for f in registry.all_fusions() if f.conflicts_with(toy)} == {"o_proj_residual"}
    model.flags = FusionFlags([NAME])
    try:
        assert [s.name for s in model.segments()].count(NAME) == model.config.num_hidden_layers
    finally:
        model.flags = model.default_flags()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5])
def test_4_numerics_through_the_fused_callable(toy, model, kernel, dtype, rows, device):
    generator = torch.Generator(device=device).manual_seed(rows)
    args = (toy, model.program(), model.config, rows, dtype, device.type)
    results = check_fusion(*args, generator)
    assert [r.name for r in results] == [f"{NAME}.residual"]
    assert all(r.ok for r in results), [r.summary() for r in results]
    planted = Fusion(
        **{**toy.__dict__, "fused": lambda residual, o: kernel.scaled_add(residual, o, 1.01)}
    )
    assert not any(r.ok for r in check_fusion(planted, *args[1:], generator))


@on_cpu
def test_5_the_suite_s_stages_check_it_on_cpu(toy, run):
    assert NAME in run["model"]["fusions"]
    toy_checks = [r for r in run["numerics"] if r["name"].startswith(f"{NAME}.")]
    assert toy_checks and all(r["ok"] for r in toy_checks), toy_checks
    for stage in ("launches", "kernel_ratios", "e2e"):
        assert "needs a CUDA GPU" in run[f"{stage}_note"]


@on_cpu
def test_5_its_launches_are_counted_on_a_cpu_trace(toy, model, tmp_path):
    """Host ranges of an eager decode trace: one range per instance a step, in place of the
    op it replaces (kernel counts need a GPU's trace)."""
    model.flags = FusionFlags([NAME])
    try:
        runner = Runner(model, max_seq_len=PLAN.prompt_len + 8)
        path = record_decode_trace(runner, 2, tmp_path / "trace.json", prompt_len=4)
    finally:
        model.flags = model.default_flags()
    segments = breakdown.segment_times(path, measure.segment_names(model))["segments"]
    assert segments[NAME]["instances_per_step"] == model.config.num_hidden_layers
    assert "attn_residual_add" not in segments


def test_5_the_committed_baselines_report_it_not_yet_baselined(toy):
    """CPU CI stays green before any GPU record; the GPU gate refuses with exit 3."""
    files = sorted(baselines.BASELINE_ROOT.glob(f"*/{baselines.BASELINE_FILE}"))
    if not files:
        pytest.skip("no baseline committed yet")
    from engine.config import default_config

    for path in files:
        stored = json.loads(path.read_text())
        config = default_config().replace(**stored["model"]["config"])
        with on_meta(getattr(torch, stored["model"]["dtype"])):
            now = measure.model_summary(Qwen3ForCausalLM(config))
        new = baselines.not_yet_baselined(now, stored["model"])
        # The toy, and any fusion registered since this baseline was recorded.
        assert NAME in new and set(new) <= {f.name for f in registry.all_fusions()}, path
        assert not set(new) & set(stored["model"]["fusions"]), path
        current = {**stored, "model": now}
        with pytest.raises(
            baselines.NotYetBaselined, match=f"not yet baselined: .*{NAME}"
        ) as raised:
            baselines.check_comparable(current, stored)
        assert isinstance(raised.value, baselines.BaselineError)  # the CLI's exit 3
    # The CPU checks of the committed baselines pass, saying so.
    import test_gate

    with pytest.warns(UserWarning, match=f"not yet baselined: .*{NAME}"):
        test_gate.test_the_committed_baseline_is_usable_and_gates_every_fusion()
    with pytest.warns(UserWarning, match=f"not yet baselined: .*{NAME}"):
        test_gate.test_the_committed_baseline_describes_the_code_as_it_is()


@on_cpu
def test_6_a_baseline_recorded_on_cpu_gates_it_and_the_report_shows_it(toy, model, run, tmp_path):
    """Step 6 (``record``, here on CPU into tmp_path): launch counts, ratios and tok/s made up
    as a GPU would measure them (gate_helpers), numerics as measured above."""
    recorded = synthetic_report(seed=1, model=model)
    recorded["numerics"] = run["numerics"]
    path, replaced = baselines.write_baseline(recorded, root=tmp_path)
    assert replaced is None and path.is_relative_to(tmp_path)
    baseline = baselines.load_baseline(H100[1], root=tmp_path)
    assert NAME in baseline["model"]["fusions"]
    assert f"{NAME}/m1/unfused" in baseline["kernel_ratios"]
    assert NAME in baseline["e2e"]["b1"]["speedups"]

    again = synthetic_report(seed=2, model=model)
    again["numerics"] = run["numerics"]
    result = gate.compare(again, baseline)
    assert result.ok, result.summary()
    slower = synthetic_report(seed=2, model=model, ratio_scale={NAME: 1.05})
    assert {c.key.split("/")[0] for c in gate.compare(slower, baseline).failures} == {NAME}
    extra = synthetic_report(seed=3, model=model, extra_kernels={NAME: 1})
    assert any(NAME in c.key for c in gate.compare(extra, baseline).failures)
    wrong = json.loads(json.dumps(again))
    for r in wrong["numerics"]:
        if r["name"].startswith(f"{NAME}."):
            r["ok"] = False
    assert {c.stage for c in gate.compare(wrong, baseline).failures} == {"numerics"}

    text = report.text(again, baseline)
    for section in (report.launches_table, report.ratios_table, report.e2e_table):
        assert NAME in section(again, baseline)
    assert "numerics:" in text and "FAIL" not in text
