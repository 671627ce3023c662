"""Every user error of the command lines is one line naming what is wrong, exit 2 (3 for an
unusable baseline), no traceback; nothing allocates without bound.

Two parts. First, one named test per case a new user hit: a config of a billion layers, a
batch of a billion, --out naming a file or an unwritable place, --combine runs that are not
runs, FUSIONGUARD_TRITON unknown or asking for compiled kernels without a GPU, NaN weights in
a checkpoint, kernel inputs that require grad. Second, a replay of bad inputs (CLI arguments,
config fields, checkpoint files, run files, baselines, environment variables), each with the
exit code and a piece of the message that names the offending input. Most run in-process
through main() (fast); the environment variables and a representative few run as processes.
Every in-process case also checks that the process's peak memory did not grow by more than
MAX_GROWTH (a size that cannot fit must fail before it is allocated).
"""

from __future__ import annotations

import copy
import errno
import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import engine
import profiling.__main__ as profiling_cli
from engine.__main__ import main as engine_main
from engine.config import SMALL_CONFIG_PATH, Qwen3Config, default_config, small_config
from profiling import baselines, measure, report
from profiling.validate import run_problems

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
MAX_GROWTH_KB = 512 * 1024  # ru_maxrss is in KiB on Linux
GPU_RUN = ROOT / "tests" / "data" / "tp2_gate_run.json.gz"
H100_BASELINE = ROOT / "perf_baselines" / "nvidia-h100-80gb-hbm3" / "baseline.json"


# --- Running the commands --------------------------------------------------------------------


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _call(main, args) -> int:
    try:
        return main(list(args))
    except SystemExit as exc:  # argparse, and the engine's user errors
        return exc.code


def _assert_one_line_error(code: int, err: str, expected_code: int, names: list[str]) -> str:
    """The exit code, no traceback, and one error line naming every piece of ``names``."""
    assert code == expected_code, err
    assert "Traceback" not in err, err
    # argparse prints its usage lines before its one error line; "note:" lines inform
    skip = ("usage:", " ", "note:")
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(skip)]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


def _in_process(capsys, main, args, expected_code, names) -> str:
    before = _peak_kb()
    code = _call(main, args)
    grew = _peak_kb() - before
    assert grew < MAX_GROWTH_KB, f"peak memory grew {grew / 1024:.0f} MiB for {args}"
    return _assert_one_line_error(code, capsys.readouterr().err, expected_code, names)


def _process(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    for name in ("FUSIONGUARD_TRITON", "TRITON_INTERPRET"):
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _write_config(directory: Path, name: str = "config.json", **changes) -> Path:
    path = directory / name
    path.write_text(json.dumps({**small_config().to_hf_dict(), **changes}))
    return path


def _save_checkpoint(directory: Path, edit=None, dtype=torch.float32) -> Path:
    """The small model's random weights as an HF checkpoint (config.json + safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = small_config()
    model = engine.build(config, dtype=torch.float32, device="cpu", seed=1)
    tensors = {
        name: t.detach().to(dtype).contiguous().clone()
        for name, t in model.hf_weight_map().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    if edit is not None:
        edit(tensors)
    safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return directory


def _gpu_run() -> dict:
    return json.loads(gzip.decompress(GPU_RUN.read_bytes()))


@pytest.fixture
def no_measuring(monkeypatch):
    """Fail the test if anything is measured (a check must come first)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("measured before the inputs were checked")

    monkeypatch.setattr(profiling_cli, "build_model", forbidden)
    monkeypatch.setattr(profiling_cli, "_measure_run", forbidden)
    for name in ("measure_launches", "measure_numerics", "measure_kernel_ratios", "measure_e2e"):
        monkeypatch.setattr(measure, name, forbidden)


# --- The cases a new user hit -------------------------------------------------------------------


def test_a_config_of_a_billion_layers_fails_at_once_saying_what_it_needs_and_has(tmp_path):
    config = _write_config(tmp_path, num_hidden_layers=1_000_000_000)
    result = _process("engine", "--config", str(config))
    line = _assert_one_line_error(
        result.returncode, result.stderr, 2, [str(config), "1000000000 layers", "needed", "free"]
    )
    assert "weights" in line


def test_a_batch_of_a_billion_fails_before_allocating_saying_what_it_needs(capsys):
    line = _in_process(
        capsys,
        engine_main,
        ["--config", str(SMALL_CONFIG_PATH), "--batch-size", "1000000000"],
        2,
        ["--batch-size 1000000000", "needed", "KV cache", "free"],
    )
    assert "GiB" in line


@pytest.mark.parametrize("command", ["report", "measure"])
def test_out_naming_an_existing_file_is_refused_before_measuring(
    tmp_path, capsys, no_measuring, command
):
    existing = tmp_path / "report"
    existing.write_text("not a folder")
    _in_process(
        capsys,
        profiling_cli.main,
        [command, "--out", str(existing)],
        2,
        [f"--out {existing}", "not a folder"],
    )
    assert existing.read_text() == "not a folder"


@pytest.mark.parametrize("command", ["report", "measure", "gate"])
def test_out_that_cannot_be_written_is_refused_before_measuring(
    tmp_path, capsys, monkeypatch, no_measuring, command
):
    """A read-only filesystem (EROFS), as the OS reports it to the write check."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    out = tmp_path / "out"
    _in_process(
        capsys,
        profiling_cli.main,
        [command, "--out", str(out)],
        2,
        [f"--out {out}", "Read-only file system"],
    )


def test_a_write_that_fails_after_measuring_is_one_line_naming_the_file(
    tmp_path, capsys, monkeypatch
):
    """The disk turned read-only between the check and the write: still one line, exit 2."""
    target = tmp_path / "run" / "run.json"

    def read_only(data, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(profiling_cli, "_measure_run", lambda args: {})
    monkeypatch.setattr(report, "write_json", read_only)
    _in_process(
        capsys,
        profiling_cli.main,
        ["measure", "--out", str(target.parent)],
        2,
        ["Read-only file system", str(target)],
    )


def test_out_in_a_place_the_os_refuses_is_one_line_as_a_process(tmp_path):
    forbidden = Path("/sys/fusionguard-report")
    if not Path("/sys").is_dir() or _can_mkdir(forbidden):
        pytest.skip("no unwritable system folder here")
    result = _process("profiling", "report", "--out", str(forbidden))
    _assert_one_line_error(result.returncode, result.stderr, 2, [f"--out {forbidden}"])


def _can_mkdir(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


def test_a_run_whose_figures_are_strings_is_refused_naming_the_file_and_field(tmp_path, capsys):
    run = _gpu_run()
    key = next(iter(run["kernel_ratios"]))
    run["kernel_ratios"][key]["ratio"] = str(run["kernel_ratios"][key]["ratio"])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    _in_process(
        capsys,
        profiling_cli.main,
        ["record", "--combine", str(path), "--root", str(tmp_path / "b")],
        2,
        [f"--combine {path}", f"kernel_ratios.{key}"],
    )


def test_a_run_whose_e2e_batch_is_a_string_is_refused_naming_the_field(tmp_path, capsys):
    run = _gpu_run()
    run["e2e"]["b1"] = "1402.7"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    _in_process(
        capsys,
        profiling_cli.main,
        ["record", "--combine", str(path), "--root", str(tmp_path / "b")],
        2,
        [f"--combine {path}", "e2e.b1"],
    )


def test_a_run_that_is_a_json_list_is_refused_as_not_a_run(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps([_gpu_run()]))
    line = _in_process(
        capsys,
        profiling_cli.main,
        ["record", "--combine", str(path), "--root", str(tmp_path / "b")],
        2,
        [f"--combine {path}", "a list, not a JSON object"],
    )
    assert "CPU runs" not in line


def test_a_real_gpu_run_is_accepted_by_combine(tmp_path, capsys):
    """The check refuses what is wrong, not every run: the recorded GPU run makes a baseline."""
    run = _gpu_run()
    assert run_problems(run) == []
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    root = tmp_path / "baselines"
    assert profiling_cli.main(["record", "--combine", str(path), "--root", str(root)]) == 0
    written = list(root.rglob("baseline.json"))
    assert len(written) == 1 and baselines.validate(json.loads(written[0].read_text())) == []


@pytest.mark.parametrize("module", ["engine", "profiling"])
def test_an_unknown_fusionguard_triton_is_one_line_naming_it(tmp_path, module):
    args = ["--config", str(SMALL_CONFIG_PATH)] if module == "engine" else ["measure"]
    result = _process(module, *args, env={"FUSIONGUARD_TRITON": "bogus"})
    _assert_one_line_error(
        result.returncode, result.stderr, 2, ["FUSIONGUARD_TRITON='bogus'", "auto, compiled"]
    )


@pytest.mark.skipif(HAS_GPU, reason="compiled kernels without a GPU: a CPU machine's error")
@pytest.mark.parametrize("module", ["engine", "profiling"])
def test_compiled_kernels_without_a_gpu_say_to_set_fusionguard_triton_interpreted(module):
    args = ["--config", str(SMALL_CONFIG_PATH)] if module == "engine" else ["measure"]
    result = _process(module, *args, env={"FUSIONGUARD_TRITON": "compiled"})
    line = _assert_one_line_error(
        result.returncode, result.stderr, 2, ["FUSIONGUARD_TRITON=compiled", "no CUDA GPU"]
    )
    assert "FUSIONGUARD_TRITON=interpreted" in line and "TRITON_INTERPRET=1" not in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_checkpoint_with_a_non_finite_weight_is_an_error_naming_the_tensor(tmp_path, capsys, bad):
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(tensors):
        flat = tensors[name].view(-1)
        flat[torch.randint(0, flat.numel(), (1,)).item()] = bad

    directory = _save_checkpoint(tmp_path / "ckpt", poison)
    _in_process(
        capsys,
        engine_main,
        ["--checkpoint", str(directory), "--max-new-tokens", "2"],
        2,
        [repr(name), "NaN or inf", str(directory / "model.safetensors")],
    )


def test_a_finite_checkpoint_loads_and_one_that_overflows_the_dtype_is_refused(tmp_path, capsys):
    """The finite check passes a sound checkpoint; a float32 value past float16's range, which
    becomes inf only when cast, is refused naming the tensor and the dtype."""
    name = "model.layers.0.self_attn.o_proj.weight"
    sound = _save_checkpoint(tmp_path / "sound")
    model = engine.build(checkpoint=sound, dtype=torch.float32, device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    def huge(tensors):
        tensors[name][0, 0] = 1e6

    directory = _save_checkpoint(tmp_path / "huge", huge)
    engine.build(checkpoint=directory, dtype=torch.float32, device="cpu")  # fits float32
    _in_process(
        capsys,
        engine_main,
        ["--checkpoint", str(directory), "--dtype", "float16", "--max-new-tokens", "2"],
        2,
        [repr(name), "overflows torch.float16"],
    )


def _launchers(device: str = "cpu"):
    from kernels.linear_residual import linear_residual
    from kernels.rms_norm import add_rms_norm, rms_norm
    from kernels.rms_norm_linear import rms_norm_linear
    from kernels.rms_norm_swiglu import rms_norm_swiglu
    from kernels.silu_mul import silu_mul

    M, K, N = 3, 32, 16
    kw = {"device": device}
    x, r = torch.randn(M, K, **kw), torch.randn(M, N, **kw)
    w, nw, gu = torch.randn(N, K, **kw), torch.rand(K, **kw) + 0.5, torch.randn(2 * N, K, **kw)
    return {
        "rms_norm": (rms_norm, {"x": x, "weight": nw}, (1e-6,)),
        "add_rms_norm": (add_rms_norm, {"x": x, "residual": x.clone(), "weight": nw}, (1e-6,)),
        "linear_residual": (linear_residual, {"x": x, "residual": r, "weight": w}, ()),
        "rms_norm_linear": (rms_norm_linear, {"x": x, "norm_weight": nw, "weight": w}, (1e-6,)),
        "rms_norm_swiglu": (
            rms_norm_swiglu,
            {"x": x, "norm_weight": nw, "gate_up_weight": gu},
            (1e-6,),
        ),
        "silu_mul": (silu_mul, {"gate_up": torch.randn(M, 2 * N, **kw)}, ()),
    }


@pytest.mark.parametrize("kernel", sorted(_launchers()))
def test_an_input_that_requires_grad_is_refused_naming_it_under_grad_mode(kernel, device):
    """The Triton kernels have no backward: the output would silently leave the graph."""
    fn, inputs, rest = _launchers(device.type)[kernel]
    for name in inputs:
        args = {k: (v.clone().requires_grad_(k == name)) for k, v in inputs.items()}
        with pytest.raises(ValueError, match=f"^{name} requires grad.*no backward"):
            fn(*args.values(), *rest)
    args = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with torch.no_grad():
        out = fn(*args.values(), *rest)
    outs = out if isinstance(out, tuple) else (out,)  # add_rms_norm: (normed, residual)
    assert all(torch.isfinite(o).all() for o in outs) and not outs[0].requires_grad


# --- The first hour -----------------------------------------------------------------------------


def test_the_shipped_small_config_is_the_small_architecture():
    shipped = Qwen3Config.from_hf_json(SMALL_CONFIG_PATH)
    assert shipped.replace(source="x") == small_config().replace(source="x")


def test_the_engine_runs_the_shipped_small_config_and_cuda_graph_on_cpu_says_eager_once(capsys):
    if HAS_GPU:
        pytest.skip("a CPU machine's output")
    code = engine_main(
        [
            "--config",
            str(SMALL_CONFIG_PATH),
            "--cuda-graph",
            "--prompt-len",
            "4",
            "--max-new-tokens",
            "3",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "cuda-graph" not in out and "capture" not in out, out
    assert "; eager)" in out
    assert err.count("decoding eagerly") + err.count("decode runs eagerly") == 1, err


def test_the_without_tox_parallel_pytest_option_is_installed():
    """`python -m pytest -n auto` needs pytest-xdist in the tox CPU env and the test extra."""
    import tomllib

    tox = (ROOT / "tox.ini").read_text()
    cpu = tox.split("[testenv:cpu]")[1].split("\n[")[0]
    assert "pytest-xdist" in cpu
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("pytest-xdist") for d in extra["optional-dependencies"]["test"])


# --- Replay: bad inputs -------------------------------------------------------------------------

# (id, CLI arguments after --config CONFIG, exit code, pieces of the one error line)
ENGINE_ARGS = [
    ("prompt-len-0", ["--prompt-len", "0"], ["--prompt-len"]),
    ("prompt-len-negative", ["--prompt-len", "-5"], ["--prompt-len"]),
    ("prompt-len-word", ["--prompt-len", "abc"], ["--prompt-len", "abc"]),
    ("prompt-len-float", ["--prompt-len", "1.5"], ["--prompt-len", "1.5"]),
    ("max-new-0", ["--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("max-new-word", ["--max-new-tokens", "x"], ["--max-new-tokens"]),
    ("batch-0", ["--batch-size", "0"], ["--batch-size"]),
    ("batch-negative", ["--batch-size", "-1"], ["--batch-size"]),
    ("batch-word", ["--batch-size", "two"], ["--batch-size"]),
    ("batch-billion", ["--batch-size", "1000000000"], ["--batch-size 1000000000", "needed"]),
    ("batch-10-million", ["--batch-size", "10000000"], ["--batch-size 10000000", "needed"]),
    ("dtype-float64", ["--dtype", "float64"], ["--dtype", "float64"]),
    ("dtype-int8", ["--dtype", "int8"], ["--dtype"]),
    ("fusions-unknown", ["--fusions", "bogus"], ["bogus"]),
    ("fusions-one-unknown", ["--fusions", "o_proj_residual,bogus"], ["bogus"]),
    ("tp-0", ["--tp", "0"], ["--tp"]),
    ("tp-word", ["--tp", "x"], ["--tp"]),
    ("seed-negative", ["--seed", "-1"], ["--seed", "-1"]),
    ("seed-too-big", ["--seed", str(2**64)], ["--seed"]),
    ("seed-word", ["--seed", "x"], ["--seed"]),
    ("rounds-0", ["--rounds", "0"], ["--rounds"]),
    ("unknown-option", ["--nonsense"], ["--nonsense"]),
    ("positional", ["extra"], ["extra"]),
    ("prompt-past-positions", ["--prompt-len", "300"], ["--prompt-len 300", "256"]),
    (
        "prompt-plus-new-past-positions",
        ["--prompt-len", "200", "--max-new-tokens", "100"],
        ["--max-new-tokens 100", "max_position_embeddings"],
    ),
    ("checkpoint-missing", ["--checkpoint", "/nonexistent/ckpt"], ["/nonexistent/ckpt"]),
    ("checkpoint-a-file", ["--checkpoint", str(SMALL_CONFIG_PATH)], [str(SMALL_CONFIG_PATH)]),
    ("tp-not-world-size", ["--tp", "2"], ["--tp 2", "world size is 1"]),
    ("tp-not-dividing-heads", ["--tp", "3"], ["num_attention_heads", "--tp 3"]),
    (
        "fusions-alternatives",
        ["--fusions", "add_rms_norm,down_proj_residual"],
        ["add_rms_norm", "down_proj_residual"],
    ),
    ("fusions-tp-only", ["--fusions", "all_reduce_residual"], ["all_reduce_residual"]),
]


@pytest.mark.parametrize(
    ("args", "names"), [c[1:] for c in ENGINE_ARGS], ids=[c[0] for c in ENGINE_ARGS]
)
def test_replay_engine_arguments(capsys, args, names):
    _in_process(capsys, engine_main, ["--config", str(SMALL_CONFIG_PATH), *args], 2, names)


# (id, changes to the small config.json, the field the message names)
CONFIG_FIELDS = [
    (f"{field}-{label}", {field: value}, field)
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    )
    for label, value in (
        ("zero", 0),
        ("negative", -4),
        ("null", None),
        ("string", "8"),
        ("float", 1.5),
        ("bool", True),
    )
] + [
    ("rope-theta-zero", {"rope_theta": 0}, "rope_theta"),
    ("rope-theta-string", {"rope_theta": "1e4"}, "rope_theta"),
    ("rope-theta-null", {"rope_theta": None}, "rope_theta"),
    ("rms-eps-zero", {"rms_norm_eps": 0}, "rms_norm_eps"),
    ("rms-eps-negative", {"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ("rms-eps-string", {"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ("architectures-string", {"architectures": "Qwen3ForCausalLM"}, "architectures"),
    ("architectures-llama", {"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
    ("model-type-llama", {"model_type": "llama"}, "llama"),
    ("hidden-act-gelu", {"hidden_act": "gelu"}, "hidden_act"),
    ("attention-bias-true", {"attention_bias": True}, "attention_bias"),
    ("attention-bias-string", {"attention_bias": "false"}, "attention_bias"),
    ("sliding-window", {"use_sliding_window": True}, "use_sliding_window"),
    ("tie-string", {"tie_word_embeddings": "true"}, "tie_word_embeddings"),
    ("rope-scaling", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE scaling"),
    ("rope-parameters-string", {"rope_parameters": "x"}, "rope_parameters"),
    ("torch-dtype-int8", {"torch_dtype": "int8"}, "torch_dtype"),
    ("heads-not-multiple", {"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple"),
    ("head-dim-odd", {"head_dim": 15}, "head_dim"),
    ("layers-billion", {"num_hidden_layers": 10**9}, "1000000000 layers"),
    ("vocab-huge", {"vocab_size": 10**12}, "vocab 1000000000000"),
    ("hidden-huge", {"hidden_size": 10**7}, "hidden_size 10000000"),
    ("intermediate-huge", {"intermediate_size": 10**10}, "intermediate 10000000000"),
    ("positions-huge", {"max_position_embeddings": 10**13}, "RoPE tables"),
]


@pytest.mark.parametrize(
    ("changes", "name"), [c[1:] for c in CONFIG_FIELDS], ids=[c[0] for c in CONFIG_FIELDS]
)
def test_replay_config_fields(tmp_path, capsys, changes, name):
    config = _write_config(tmp_path, **changes)
    _in_process(capsys, engine_main, ["--config", str(config)], 2, [str(config), name])


def test_replay_config_missing_field(tmp_path, capsys):
    raw = small_config().to_hf_dict()
    del raw["hidden_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    _in_process(capsys, engine_main, ["--config", str(path)], 2, [str(path), "hidden_size"])


CONFIG_FILES = [
    ("not-json", "{not json", "not valid JSON"),
    ("empty", "", "not valid JSON"),
    ("list", "[1, 2]", "JSON object"),
    ("string", '"qwen3"', "JSON object"),
    ("number", "3", "JSON object"),
    ("binary", b"\xff\xfe\x00garbage", "not valid JSON"),
]


@pytest.mark.parametrize(
    ("content", "message"), [c[1:] for c in CONFIG_FILES], ids=[c[0] for c in CONFIG_FILES]
)
def test_replay_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    _in_process(capsys, engine_main, ["--config", str(path)], 2, [str(path), message])


def test_replay_config_that_is_a_folder_without_config_json(tmp_path, capsys):
    _in_process(capsys, engine_main, ["--config", str(tmp_path)], 2, ["config file not found"])


def _edit_drop(name):
    return lambda t: t.pop(name)


def _edit_add(name):
    return lambda t: t.__setitem__(name, torch.randn(4))


def _edit_shape(name):
    return lambda t: t.__setitem__(name, torch.randn(3, 3))


def _edit_dtype(name):
    return lambda t: t.__setitem__(name, t[name].to(torch.int32))


CHECKPOINTS = [
    ("missing-tensor", _edit_drop("model.norm.weight"), ["model.norm.weight", "missing"]),
    ("unexpected-tensor", _edit_add("model.layers.9.extra"), ["model.layers.9.extra"]),
    ("wrong-shape", _edit_shape("model.layers.0.input_layernorm.weight"), ["input_layernorm"]),
    ("integer-dtype", _edit_dtype("model.layers.0.mlp.up_proj.weight"), ["up_proj", "int32"]),
]


@pytest.mark.parametrize(
    ("edit", "names"), [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS]
)
def test_replay_checkpoint_tensors(tmp_path, capsys, edit, names):
    directory = _save_checkpoint(tmp_path / "ckpt", edit)
    _in_process(capsys, engine_main, ["--checkpoint", str(directory)], 2, names)


CHECKPOINT_FILES = [
    ("no-safetensors", lambda d: (d / "model.safetensors").unlink(), ["no *.safetensors"]),
    (
        "corrupt-safetensors",
        lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64),
        ["model.safetensors", "not a readable safetensors"],
    ),
    (
        "truncated-safetensors",
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:999]
        ),
        ["model.safetensors"],
    ),
    ("no-config", lambda d: (d / "config.json").unlink(), ["config.json"]),
    (
        "index-not-json",
        lambda d: (d / "model.safetensors.index.json").write_text("{"),
        ["model.safetensors.index.json", "not valid JSON"],
    ),
    (
        "index-without-map",
        lambda d: (d / "model.safetensors.index.json").write_text("{}"),
        ["model.safetensors.index.json", "weight_map"],
    ),
    (
        "index-missing-shard",
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "shard-2.safetensors"}})
        ),
        ["shard-2.safetensors"],
    ),
    (
        "index-file-not-string",
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": 3}})
        ),
        ["weight_map", "model.norm.weight"],
    ),
]


@pytest.mark.parametrize(
    ("edit", "names"), [c[1:] for c in CHECKPOINT_FILES], ids=[c[0] for c in CHECKPOINT_FILES]
)
def test_replay_checkpoint_files(tmp_path, capsys, edit, names):
    directory = _save_checkpoint(tmp_path / "ckpt")
    edit(directory)
    _in_process(capsys, engine_main, ["--checkpoint", str(directory)], 2, names)


# Cache positions of the model the profiling commands measure here (the small model on CPU).
_POSITIONS = (default_config() if HAS_GPU else small_config()).max_position_embeddings

# (id, arguments, exit code, pieces of the error line)
PROFILING_ARGS = [
    ("unknown-command", ["nonsense"], 2, ["invalid choice"]),
    ("rounds-3", ["--rounds", "3"], 2, ["--rounds must be >= 5"]),
    ("rounds-0", ["--rounds", "0"], 2, ["--rounds"]),
    ("rounds-word", ["--rounds", "x"], 2, ["--rounds"]),
    ("batches-0", ["--batches", "0"], 2, ["--batches"]),
    ("batches-word", ["--batches", "x"], 2, ["--batches"]),
    ("batches-billion", ["measure", "--batches", "1000000000"], 2, ["--batches up to", "needed"]),
    ("layers-0", ["--layers", "0"], 2, ["--layers"]),
    ("layers-negative", ["--layers", "-1"], 2, ["--layers"]),
    ("layers-billion", ["measure", "--layers", "1000000000"], 2, ["(--layers)", "needed"]),
    ("prompt-len-0", ["--prompt-len", "0"], 2, ["--prompt-len"]),
    (
        "prompt-len-past-positions",
        ["measure", "--prompt-len", str(_POSITIONS)],
        2,
        [f"--prompt-len {_POSITIONS}"],
    ),
    (
        "new-tokens-past-positions",
        ["report", "--new-tokens", str(_POSITIONS)],
        2,
        [f"--new-tokens {_POSITIONS}"],
    ),
    ("new-tokens-word", ["--new-tokens", "x"], 2, ["--new-tokens"]),
    ("processes-0", ["record", "--processes", "0"], 2, ["--processes"]),
    ("tp-0", ["--tp", "0"], 2, ["--tp"]),
    ("tp-not-world-size", ["measure", "--tp", "2"], 2, ["--tp 2", "WORLD_SIZE"]),
    ("size-unknown", ["--size", "99b"], 2, ["--size"]),
    ("size-and-small", ["--size", "4b", "--small"], 2, ["--size and --small"]),
    ("gate-layers", ["gate", "--layers", "3"], 2, ["gate measures what its baseline measured"]),
    ("report-pytest-arg", ["report", "-k", "o_proj"], 2, ["unrecognized arguments"]),
    ("measure-positional", ["measure", "extra"], 2, ["unrecognized arguments: extra"]),
    ("seed-word", ["--seed", "x"], 2, ["--seed"]),
    ("combine-missing", ["record", "--combine", "/nonexistent/run.json"], 2, ["run.json"]),
]
if not HAS_GPU:
    PROFILING_ARGS += [
        ("size-on-cpu", ["--size", "0.6b"], 2, ["needs a CUDA GPU"]),
        ("gate-on-cpu", ["gate"], 2, ["needs a CUDA GPU"]),
        ("record-on-cpu", ["record"], 2, ["needs a CUDA GPU"]),
        ("bench-on-cpu", ["bench"], 2, ["needs a CUDA GPU"]),
    ]


@pytest.mark.parametrize(
    ("args", "code", "names"), [c[1:] for c in PROFILING_ARGS], ids=[c[0] for c in PROFILING_ARGS]
)
def test_replay_profiling_arguments(tmp_path, capsys, no_measuring, args, code, names):
    root = ["--root", str(tmp_path / "baselines")]
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    _in_process(capsys, profiling_cli.main, [*args, *root, *out], code, names)


def _set(path: str, value):
    def edit(run):
        *parents, last = path.split(".")
        node = run
        for p in parents:  # FIRST: the first key of an object
            if isinstance(node, list):
                node = node[int(p)]
            else:
                node = node[next(iter(node)) if p == "FIRST" else p]
        if last == "FIRST":
            last = next(iter(node))
        node[last] = value
        return run

    return edit


RUNS = [
    ("list", lambda run: [run], ["a list, not a JSON object"]),
    ("string", lambda run: "run", ["a string, not a JSON object"]),
    ("empty-object", lambda run: {}, ["'gpu' is not a string"]),
    ("gpu-number", _set("gpu", 3), ["'gpu' is not a string"]),
    ("model-list", _set("model", []), ["'model' is not an object"]),
    ("config-strings", _set("model.config.hidden_size", "1024"), ["model.config"]),
    ("dtype-number", _set("model.dtype", 16), ["model.dtype"]),
    ("plan-string", _set("plan", "default"), ["'plan'"]),
    ("numerics-object", _set("numerics", {}), ["numerics"]),
    ("numerics-ok-string", _set("numerics.0.ok", "true"), ["numerics"]),
    ("launches-empty", _set("launches", {}), ["'launches'"]),
    ("launch-count-string", _set("launches.FIRST.kernels_per_step", "172"), ["launches."]),
    ("launch-segments-list", _set("launches.FIRST.segments", []), ["segments"]),
    ("ratios-list", _set("kernel_ratios", []), ["'kernel_ratios'"]),
    ("ratio-null", _set("kernel_ratios.FIRST.ratio", None), ["kernel_ratios."]),
    ("fused-us-string", _set("kernel_ratios.FIRST.fused_us", "1.0"), ["kernel_ratios."]),
    ("e2e-empty", _set("e2e", {}), ["'e2e'"]),
    ("e2e-b1-string", _set("e2e.b1", "1402.7"), ["e2e.b1"]),
    ("variants-missing", lambda run: run["e2e"]["b1"].pop("variants") and run, ["e2e.b1.variants"]),
    ("median-string", _set("e2e.b1.variants.default.median", "1402.7"), ["e2e.b1.variants"]),
    ("median-nan", _set("e2e.b1.variants.default.median", float("nan")), ["e2e.b1.variants"]),
    ("speedup-string", _set("e2e.b1.speedups.all.median", "1.8"), ["e2e.b1.speedups.all"]),
]


@pytest.mark.parametrize(("edit", "names"), [c[1:] for c in RUNS], ids=[c[0] for c in RUNS])
def test_replay_combine_runs(tmp_path, capsys, edit, names):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(edit(copy.deepcopy(_gpu_run()))))
    args = ["record", "--combine", str(path), "--root", str(tmp_path / "b")]
    _in_process(capsys, profiling_cli.main, args, 2, [f"--combine {path}", *names])
    assert not (tmp_path / "b").exists()  # nothing recorded


def test_replay_combine_of_a_cpu_run_says_it_measured_no_gpu_figures(tmp_path, capsys):
    run = {k: v for k, v in _gpu_run().items() if k not in ("e2e", "launches", "kernel_ratios")}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    args = ["record", "--combine", str(path), "--root", str(tmp_path / "b")]
    _in_process(capsys, profiling_cli.main, args, 2, ["CPU runs", "nothing to record"])


@pytest.fixture
def fake_gpu(monkeypatch, no_measuring):
    monkeypatch.setattr(profiling_cli, "HAS_GPU", True)


def _slug_baseline() -> dict:
    from kernels.runtime import gpu_slug

    baseline = json.loads(H100_BASELINE.read_text())
    baseline["gpu_slug"] = gpu_slug()
    return baseline


BASELINES = [
    ("not-json", "{not json", ["not valid JSON"]),
    ("empty", "", ["not valid JSON"]),
    ("list", [], ["top level is not a JSON object"]),
    ("schema", _set("schema", "fusionguard-baseline/1"), ["schema"]),
    ("gpu-number", _set("gpu", 1), ["'gpu'"]),
    ("config-string", _set("model.config.hidden_size", "1024"), ["model.config"]),
    ("fusions-empty", _set("model.fusions", {}), ["model.fusions"]),
    ("plan-rounds-0", _set("plan.rounds", 0), ["plan.rounds"]),
    ("launch-count-string", _set("launches.FIRST.kernels_per_step", "172"), ["launches."]),
    ("ratio-string", _set("kernel_ratios.FIRST.ratio", "0.3"), ["kernel_ratios."]),
    ("tolerance-huge", _set("kernel_ratios.FIRST.tolerance", 5.0), ["kernel_ratios."]),
    ("e2e-b1-string", _set("e2e.b1", "x"), ["e2e.b1"]),
    ("median-string", _set("e2e.b1.variants.default.median", "1402"), ["e2e.b1.variants"]),
    ("speedup-gated-string", _set("e2e.b1.speedups.all.gated", "yes"), ["e2e.b1.speedups.all"]),
    ("other-gpu", _set("gpu_slug", "nvidia-a100"), ["nvidia-a100"]),
]


@pytest.mark.parametrize(
    ("edit", "names"), [c[1:] for c in BASELINES], ids=[c[0] for c in BASELINES]
)
def test_replay_baselines_exit_3_before_measuring(tmp_path, capsys, fake_gpu, edit, names):
    from kernels.runtime import gpu_slug

    folder = tmp_path / gpu_slug()
    folder.mkdir()
    if isinstance(edit, str):
        content = edit
    elif isinstance(edit, list):
        content = json.dumps(edit)
    else:
        content = json.dumps(edit(_slug_baseline()))
    (folder / "baseline.json").write_text(content)
    args = ["gate", "--root", str(tmp_path), "--out", str(tmp_path / "out")]
    _in_process(capsys, profiling_cli.main, args, 3, ["GATE NOT RUN", *names])


def test_the_unedited_baseline_is_usable():
    """The baselines above fail for their edit: the same file unedited validates."""
    assert baselines.validate(_slug_baseline()) == []


# (id, module, arguments, environment, exit code, pieces of the error line): as processes
PROCESSES = [
    ("engine-debug-off", "engine", ["--batch-size", "0"], {}, ["--batch-size"]),
    (
        "engine-triton-empty-is-auto",
        "engine",
        ["--seed", "-3"],
        {"FUSIONGUARD_TRITON": ""},
        ["--seed"],
    ),
    ("engine-triton-case", "engine", [], {"FUSIONGUARD_TRITON": "Interpreted"}, ["'Interpreted'"]),
    (
        "profiling-triton-space",
        "profiling",
        ["report"],
        {"FUSIONGUARD_TRITON": " auto"},
        ["' auto'"],
    ),
    ("engine-world-size-word", "engine", [], {"WORLD_SIZE": "x"}, ["WORLD_SIZE='x'"]),
    (
        "profiling-world-size-word",
        "profiling",
        ["measure"],
        {"WORLD_SIZE": "x"},
        ["WORLD_SIZE='x'"],
    ),
]


@pytest.mark.parametrize(
    ("module", "args", "env", "names"), [c[1:] for c in PROCESSES], ids=[c[0] for c in PROCESSES]
)
def test_replay_as_processes(tmp_path, module, args, env, names):
    extra = ["--config", str(SMALL_CONFIG_PATH)] if module == "engine" else ["--out", str(tmp_path)]
    result = _process(module, *extra, *args, env=env)
    _assert_one_line_error(result.returncode, result.stderr, 2, names)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    existing = tmp_path / "file"
    existing.write_text("x")
    result = _process("profiling", "measure", "--out", str(existing), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "UsageError" in result.stderr


def test_the_replay_holds_150_bad_inputs():
    count = (
        len(ENGINE_ARGS)
        + len(CONFIG_FIELDS)
        + 1
        + len(CONFIG_FILES)
        + 1
        + len(CHECKPOINTS)
        + len(CHECKPOINT_FILES)
        + len(PROFILING_ARGS)
        + len(RUNS)
        + 1
        + len(BASELINES)
        + len(PROCESSES)
    )
    assert count >= 150, count


# --- The memory estimate --------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_the_memory_estimate_counts_every_weight_and_cache_byte_the_engine_allocates(tied):
    from engine.memory import memory_need

    config = small_config(tie_word_embeddings=tied, num_hidden_layers=3)
    model = engine.build(config, dtype=torch.float16, device="cpu")
    batch, seq = 3, 20
    runner = engine.Runner(model, max_batch_size=batch, max_seq_len=seq)
    need = memory_need(config, torch.float16, batch=batch, seq_len=seq, prompt_len=seq)
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    assert need.weights == sum(weights.values())
    caches = [(a.k_cache, a.v_cache) for a in (layer.self_attn for layer in model.model.layers)]
    assert need.kv_cache == sum(t.numel() * t.element_size() for kv in caches for t in kv)
    assert need.rope_tables == sum(t.numel() * t.element_size() for t in model.buffers())
    assert runner.max_seq_len == seq


def test_building_a_model_that_cannot_fit_fails_before_it_is_made():
    from engine.memory import MemoryFitError

    with pytest.raises(MemoryFitError, match=r"<small>: the model's weights: .* GiB needed"):
        engine.build(small_config(num_hidden_layers=10**9), dtype=torch.float32, device="cpu")
