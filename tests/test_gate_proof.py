"""The planted-regression proof's own parts, on the CPU (the proof itself runs on GPUs).

Every plant, single-GPU and tensor-parallel, still finds its anchor in this tree and yields
Python that parses; a missing anchor stops the proof naming the plant and the file. The TP
plants do what they claim where a CPU can tell: an extra aten op per norm_qkv_proj call,
norm_qkv_proj off by default, the FMA chain valid Triton with no numerical change (run
interpreted); the attention and q/k norm + RoPE chains compile in their kernels and change
no output. torchrun's exit code is read back per rank from a real torchrun on CPU;
``--rejudge`` judges a stored TP=2 gate run (two H100s) against its TP=2 baseline.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scripts import gate_proof

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("name", list(gate_proof.ALL_PLANTS))
def test_every_plant_finds_its_anchor_in_this_tree(name):
    path, apply = gate_proof.ALL_PLANTS[name]
    text = (ROOT / path).read_text()
    planted = apply(text)
    assert planted != text, f"plant {name}: its anchor is not in {path}"
    ast.parse(planted)


def test_tp_plants_are_separate_from_the_single_gpu_ones():
    assert set(gate_proof.TP_PLANTS) == {
        "tp_extra_kernel",
        "tp_slow_all_reduce",
        "tp_flag_off",
        "tp_numerics",
    }
    assert not set(gate_proof.TP_PLANTS) & set(gate_proof.PLANTS)


@pytest.mark.parametrize("name", list(gate_proof.ALL_PLANTS))
def test_a_plant_whose_anchor_is_missing_stops_the_proof(tmp_path, name):
    path, _ = gate_proof.ALL_PLANTS[name]
    target = tmp_path / path
    target.parent.mkdir(parents=True)
    target.write_text("# the code moved\n")
    with pytest.raises(SystemExit, match=f"plant {name}: its anchor is not in {path}"):
        gate_proof.plant(tmp_path, name)
    assert target.read_text() == "# the code moved\n"


def _planted_fusions(tmp_path, name):
    """engine/fusions.py with plant ``name``, loaded as a module of its own (its registry
    apart from the suite's)."""
    path, apply = gate_proof.ALL_PLANTS[name]
    assert path == "engine/fusions.py"
    file = tmp_path / f"{name}_fusions.py"
    file.write_text(apply((ROOT / path).read_text()))
    spec = importlib.util.spec_from_file_location(f"planted_{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _norm_qkv_ops(fusions, device) -> list[str]:
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(2, 64, generator=g).to(device)
    norm_weight = torch.randn(64, generator=g).to(device)
    qkv_weight = torch.randn(96, 64, generator=g).to(device)
    with _CountOps() as mode:
        fusions.get("norm_qkv_proj").fused(residual, norm_weight, 1e-6, qkv_weight)
    return mode.ops


def test_tp_extra_kernel_adds_an_op_to_every_norm_qkv_proj_call(tmp_path, device):
    from engine import fusions

    before = _norm_qkv_ops(fusions, device)
    after = _norm_qkv_ops(_planted_fusions(tmp_path, "tp_extra_kernel"), device)
    assert after.count("aten.add_") == before.count("aten.add_") + 1, (before, after)


def test_tp_flag_off_takes_norm_qkv_proj_out_of_the_defaults(tmp_path):
    from engine import fusions

    assert fusions.get("norm_qkv_proj").default
    assert not _planted_fusions(tmp_path, "tp_flag_off").get("norm_qkv_proj").default


_CHAIN_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
{chain}
    tl.store(out_ptr + offs, total, mask=mask)
"""


def test_the_all_reduce_fma_chain_is_valid_triton_and_changes_nothing(tmp_path, monkeypatch):
    """The chain the tp_slow_all_reduce plant inserts, in a kernel of the same names, run by
    the interpreter (the one-shot kernel itself needs symmetric memory on GPUs)."""
    from kernels.runtime import INTERPRETING

    if not INTERPRETING:
        pytest.skip("runs the chain through the Triton interpreter")
    chain = gate_proof._AR_FMA_CHAIN.format(n=50)
    (tmp_path / "chain_kernel.py").write_text(_CHAIN_KERNEL.format(chain=chain))
    monkeypatch.syspath_prepend(str(tmp_path))
    from chain_kernel import kernel

    x = torch.randn(300, generator=torch.Generator().manual_seed(1))
    out = torch.empty_like(x)
    kernel[(3,)](x, out, x.numel(), BLOCK=128)
    assert torch.equal(out, x)


@pytest.mark.parametrize(
    "name, op, launcher",
    [
        ("attention_slow_5pct", "attention", "decode_attention"),
        ("qk_norm_rope_slow_5pct", "qk_norm_rope", "qk_norm_rope_cache_write"),
    ],
)
def test_the_op_chains_run_in_their_kernels_and_change_nothing(
    tmp_path, monkeypatch, device, name, op, launcher
):
    """The planted kernel file, loaded apart, on the inputs a real decode step gave the op:
    its outputs (and the KV cache it writes) equal the unplanted kernel's bit for bit."""
    from engine_helpers import small_config

    import engine
    from engine import qwen3
    from profiling.kernel_timing import step_op_inputs

    path, apply = gate_proof.PLANTS[name]
    file = tmp_path / f"planted_{name}.py"
    file.write_text(apply((ROOT / path).read_text()))
    spec = importlib.util.spec_from_file_location(f"planted_{name}", file)
    planted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted)

    model = engine.build(small_config(num_hidden_layers=1), dtype=torch.float32, device=device)
    (inputs,) = step_op_inputs(model, 2, 6, seed=int(torch.randint(1000, ())))[op]
    fn = model.ops[op].fn

    def run():
        copied = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return fn(**copied), {k: v for k, v in copied.items() if k.endswith("_cache")}

    want, want_caches = run()
    monkeypatch.setattr(qwen3, launcher, getattr(planted, launcher))
    got, got_caches = run()
    assert torch.equal(got, want)
    for key in want_caches:
        assert torch.equal(got_caches[key], want_caches[key]), key


def test_tp_numerics_scales_the_residual_in_the_kernel():
    _, apply = gate_proof.TP_PLANTS["tp_numerics"]
    text = apply((ROOT / gate_proof.AR_KERNEL).read_text())
    assert "r = tl.load(residual_ptr + offs, mask=mask).to(tl.float32) * 1.01\n" in text


# --------------------------------------------------------------------------------------------
# Running the gate under torchrun
# --------------------------------------------------------------------------------------------

_EXIT = """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"rank {rank} here", flush=True)
if rank:
    time.sleep(0.3)
sys.exit(int(sys.argv[rank + 1]))
"""


@pytest.mark.parametrize(
    ("rank0", "rank1", "expected"), [(0, 0, 0), (1, 1, 1), (3, 3, 3), (0, 1, 1)]
)
def test_the_gate_exit_code_is_read_from_torchrun(tmp_path, rank0, rank1, expected):
    script = tmp_path / "exit.py"
    script.write_text(_EXIT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    proc = subprocess.run(
        [*torchrun, "--nproc-per-node=2", str(script), str(rank0), str(rank1)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode == 0) == (expected == 0)
    assert gate_proof.child_exit(proc.returncode, proc.stdout + proc.stderr) == expected


def test_the_tp_gate_command_is_torchrun_on_tp_ranks():
    cmd = gate_proof.gate_command(2, Path("out/x"))
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "profiling",
        "gate",
        "--tp",
        "2",
        "--out",
        "out/x",
    ]
    assert gate_proof.gate_command(1, Path("o"))[1:] == ["-m", "profiling", "gate", "--out", "o"]


def test_gpus_are_consumed_tp_at_a_time():
    assert gate_proof.gpu_groups(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert gate_proof.gpu_groups(["0", "1"], 2) == ["0,1"]
    assert gate_proof.gpu_groups(["0", "1"], 1) == ["0", "1"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--tp", "2", "--gpus", "0"], "--gpus"),
        (["--tp", "2", "--gpus", "0", "1", "2"], "--gpus"),
        (["--tp", "0"], "--tp"),
        (["--plants", "tp_numerics"], "--plants"),
        (["--tp", "2", "--gpus", "0", "1", "--plants", "flag_off"], "--plants"),
    ],
)
def test_bad_arguments_get_one_line_naming_them(tmp_path, capsys, argv, named):
    out = tmp_path / "proof"
    assert gate_proof.main([*argv, "--out", str(out), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {named} "), err
    assert not out.exists()


def test_rejudge_judges_a_tp_run_against_its_tp_baseline(tmp_path, capsys):
    """A TP=2 gate run on two H100s (unchanged code, which failed the gate on a 2-run baseline:
    a kernel ratio and a speed-up, on both measurements) and that baseline."""
    run = json.loads(gzip.decompress((DATA / "tp2_gate_run.json.gz").read_bytes()))
    baseline = gzip.decompress((DATA / "tp2_baseline.json.gz").read_bytes())
    root = tmp_path / "baselines"
    (root / run["gpu_slug"] / "tp2").mkdir(parents=True)
    (root / run["gpu_slug"] / "tp2" / "baseline.json").write_bytes(baseline)
    folder = tmp_path / "proof"
    (folder / "unchanged_1").mkdir(parents=True)
    (folder / "unchanged_1" / "gate.json").write_text(json.dumps(run))
    assert gate_proof.rejudge(folder, root=root) == 1
    judged = json.loads((folder / "rejudged.json").read_text())
    assert judged == [
        {
            "label": "unchanged_1",
            "plant": None,
            "verdict": "FAIL",
            "failing": [
                "kernel_ratio all_reduce_residual/m8/unfused",
                "speedup b1.speedup.add_rms_norm",
            ],
        }
    ]
    # Only the TP=1 baseline there: the TP run is never judged against it.
    shutil.move(root / run["gpu_slug"] / "tp2" / "baseline.json", root / run["gpu_slug"])
    from profiling.baselines import BaselineMissing

    with pytest.raises(BaselineMissing):
        gate_proof.rejudge(folder, root=root)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gates would measure")
def test_a_tp_proof_runs_every_job_under_torchrun_and_reads_rank_0s_exit(tmp_path, capsys):
    """Copy, plant, torchrun on 2 ranks, verdict: without a GPU every rank's gate refuses
    (exit 2), which the proof must report as such, never as a pass or a caught plant."""
    out = tmp_path / "proof"
    argv = ["--tp", "2", "--gpus", "0", "1", "--runs", "1", "--plants", "tp_numerics"]
    assert gate_proof.main([*argv, "--out", str(out), "--work", str(tmp_path / "w")]) == 1
    results = json.loads((out / "proof.json").read_text())["results"]
    assert [(r["label"], r["gpu"], r["exit"], r["verdict"]) for r in results] == [
        ("plant_tp_numerics", "0,1", 2, "USAGE"),
        ("unchanged_1", "0,1", 2, "USAGE"),
    ]
    assert "needs a CUDA GPU" in (out / "unchanged_1.log").read_text()
    printed = capsys.readouterr().out
    assert printed.count("UNEXPECTED") == 2, printed


_TORCHRUN_REPORT = """
Failures:
[1]:
  time      : 2026-11-25_19:30:57
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : {rank0} (pid: 2548)
  error_file: <N/A>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-25_19:30:57
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {rank1} (pid: 2549)
"""


@pytest.mark.parametrize(
    ("rank0", "rank1", "expected"), [(1, 1, 1), (3, 1, 3), (-15, 2, 2), (-15, -15, 1)]
)
def test_a_rank_torchrun_stopped_does_not_give_the_verdict(rank0, rank1, expected):
    """Rank 1 exits first (2, no GPU), torchrun then stops rank 0 (-15): the verdict is 2."""
    log = _TORCHRUN_REPORT.format(rank0=rank0, rank1=rank1)
    assert gate_proof.child_exit(1, log) == expected


def _planted_mlp_block(tmp_path, monkeypatch, name):
    path, apply = gate_proof.PLANTS[name]
    assert path == gate_proof.MLP_KERNEL
    file = tmp_path / f"planted_{name}.py"
    file.write_text(apply((ROOT / path).read_text()))
    spec = importlib.util.spec_from_file_location(f"planted_{name}", file)
    planted = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, planted)  # its dataclass looks itself up
    spec.loader.exec_module(planted)
    return planted


def _mlp_inputs(device):
    g = torch.Generator().manual_seed(int(torch.randint(1000, ())))
    residual = torch.randn(3, 64, generator=g)
    norm_weight = 1 + 0.2 * torch.randn(64, generator=g)
    gate_up_weight = 0.02 * torch.randn(96, 64, generator=g)
    down_proj_weight = 0.02 * torch.randn(64, 48, generator=g)
    return [t.to(device) for t in (residual, norm_weight, gate_up_weight, down_proj_weight)]


@pytest.mark.parametrize(
    "name, changes", [("mlp_block_stage_slow_5pct", False), ("mlp_block_numerics", True)]
)
def test_the_mlp_block_kernel_plants_run_in_its_one_launch(
    tmp_path, monkeypatch, device, name, changes
):
    """The planted kernel file, loaded apart: the stage chain changes no output bit, the
    numerics plant changes the residual."""
    from kernels.mlp_block import mlp_block

    planted = _planted_mlp_block(tmp_path, monkeypatch, name)
    residual, *weights = _mlp_inputs(device)
    want = mlp_block(residual.clone(), *weights, 1e-6)
    got = planted.mlp_block(residual.clone(), *weights, 1e-6)
    assert torch.equal(got, want) != changes


def test_mlp_block_off_never_takes_the_one_launch_kernel(tmp_path, device, monkeypatch):
    planted = _planted_mlp_block(tmp_path, monkeypatch, "mlp_block_off")
    launched = []
    monkeypatch.setattr(planted, "_launch", lambda *a: launched.append(a))
    residual, *weights = _mlp_inputs(device)
    planted.mlp_block(residual[:1].clone(), *weights, 1e-6)
    assert launched == []


def test_mlp_block_extra_kernel_adds_an_op_to_every_call(tmp_path, device):
    from engine import fusions

    def ops(module):
        residual, norm_weight, gate_up_weight, down_proj_weight = _mlp_inputs(device)
        with _CountOps() as mode:
            module.get("mlp_block").fused(
                residual, norm_weight, 1e-6, gate_up_weight, down_proj_weight
            )
        return mode.ops

    before = ops(fusions)
    after = ops(_planted_fusions(tmp_path, "mlp_block_extra_kernel"))
    assert after.count("aten.add_") == before.count("aten.add_") + 1, (before, after)
