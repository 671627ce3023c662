"""Every Triton kernel the engine launches compiles for Hopper (sm_90), checked on a CPU, and
its programmatic dependent launch is where the kernel says it is in the compiled PTX.

The interpreter runs kernels as Python over numpy: it accepts code the GPU compiler rejects
(shapes, constexpr use, casts). Here a subprocess imports the kernels in compiled mode, runs
the engine's launchers on fake CUDA tensors (torch's FakeTensorMode: shapes, strides and dtypes
without memory) with each launch recorded instead of run (PDL on, as on an H100), for every
fusion step (and each stage of a kernel that spans several) and every op at the default
model's decode shapes (rows 1 and 8, bf16 and fp32),
then compiles each
distinct launch (arguments' types, constexpr values, launch options) with Triton's NVIDIA
backend and ptxas. On a GPU runner the real launches compile anyway: skipped there.
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest
import torch
from engine_helpers import compile_for_hopper

import kernels

_RECORD_AND_COMPILE = r"""
import dataclasses, inspect, json, sys
import torch
import kernels  # compiled mode: FUSIONGUARD_TRITON=compiled in the environment
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

launches = []

def record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))

JITFunction.run = record
import engine  # noqa: F401  (imports every kernel module)
for name, module in list(sys.modules.items()):
    if name.startswith("kernels."):
        if hasattr(module, "pdl_supported"):
            module.pdl_supported = lambda device: True  # as on an H100
        if hasattr(module, "sm_count"):
            module.sm_count = lambda device: 132  # an H100 SXM's
        if hasattr(module, "overlaps"):  # fake tensors have no addresses: none overlap
            module.overlaps = lambda *tensors: False

from engine import fusions as registry
from engine.config import default_config
from engine.program import call_fused, draw_inputs, run_unfused, span_ops
from engine.qwen3 import Qwen3ForCausalLM
from kernels.decode_attention import decode_attention
from kernels.qk_norm_rope import qk_norm_rope_cache_write

def cuda(v):  # a fake CUDA tensor of the same layout (shapes, strides, dtype are what count)
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda")
    if dataclasses.is_dataclass(v):
        return dataclasses.replace(
            v, **{f.name: cuda(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        )
    return v

c = default_config()
with torch.device("meta"):
    program = Qwen3ForCausalLM(c).program()
generator = torch.Generator().manual_seed(0)
H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
for dtype in (torch.bfloat16, torch.float32):
    for rows in (1, 8):
        drawn = []
        # Every fusion, and each stage of one whose kernel spans several (launched alone).
        for f in [g for f in registry.all_fusions() for g in (f, *f.stage_fusions())]:
            ops = span_ops(program, f)
            drawn.append((f, ops, draw_inputs(ops, c, rows, dtype, "cpu", generator)))
        singles = []
        for b in program:
            try:
                singles.append((b.op, draw_inputs([b.op], c, rows, dtype, "cpu", generator)))
            except Exception:  # ops with a cache or step context: launched by hand below
                pass
        with FakeTensorMode(allow_non_fake_inputs=True):
            for f, ops, inputs in drawn:
                call_fused(f, ops, {k: cuda(v) for k, v in inputs.items()})
            for op, inputs in singles:
                try:
                    run_unfused([op], {k: cuda(v) for k, v in inputs.items()})
                except RuntimeError as exc:  # an op that slices: fake CUDA needs CUDA for it
                    if "not linked with support for cuda" not in str(exc):
                        raise
            qkv = torch.empty(rows, (H + 2 * Hkv) * D, dtype=dtype, device="cuda")
            k_cache = torch.empty(rows, Hkv, 64, D, dtype=dtype, device="cuda")
            v_cache = torch.empty_like(k_cache)
            positions = torch.empty(rows, dtype=torch.int32, device="cuda")
            tables = [torch.empty(64, D // 2, device="cuda") for _ in range(2)]
            norms = [torch.empty(D, dtype=dtype, device="cuda") for _ in range(2)]
            qk_norm_rope_cache_write(
                qkv, *norms, *tables, positions, k_cache, v_cache, num_heads=H,
                num_kv_heads=Hkv, head_dim=D, tokens_per_seq=1, eps=c.rms_norm_eps,
            )
            # q as the engine passes it: a view of qkv's first H * D columns (slicing a fake
            # CUDA tensor needs CUDA here, so the same layout is made directly).
            q = torch.empty_strided((rows, H, D), (qkv.shape[1], D, 1), dtype=dtype, device="cuda")
            decode_attention(q, k_cache, v_cache, positions)

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl", "maxnreg")
seen, compiled = set(), []
for jit, args, kwargs in launches:
    params = inspect.signature(jit.fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs = {}, {}
    for p in jit.params:
        value = bound.get(p.name, params[p.name].default)
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{jit.fn.__name__}: {p.name}={value!r}")
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    key = (jit.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
           tuple(sorted(options.items())))
    if key in seen:
        continue
    seen.add(key)
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["cubin"], key
    # The PDL contract as compiled: where the wait and the trigger sit among global loads.
    marks = "".join(
        "W" if "griddepcontrol.wait" in line else "T" if "griddepcontrol.launch_dependents" in line
        else "L"
        for line in kernel.asm["ptx"].splitlines()
        if "griddepcontrol" in line or "ld.global" in line
    )
    compiled.append({
        "kernel": jit.fn.__name__, "options": options, "waits": marks.count("W"),
        "triggers": marks.count("T"), "loads_before_wait": marks.split("W")[0].count("L"),
        "trigger_after_wait": "W" in marks and marks.find("T") > marks.find("W"),
    })
print(json.dumps(compiled))
"""


@pytest.fixture(scope="module")
def compiled():
    if torch.cuda.is_available():
        pytest.skip("on a GPU runner every launch compiles for the GPU itself")
    result = compile_for_hopper(_RECORD_AND_COMPILE)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _declared(attribute: str) -> set[str]:
    """The kernel names every kernel module declares under ``attribute`` (READS_BEFORE_WAIT:
    kernels that read before the PDL wait what the kernel before them does not write: weights,
    positions, rope tables, older cache rows; TRIGGER_AFTER_WAIT: kernels that let the next one
    launch only after their wait)."""
    names: set[str] = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        names.update(getattr(module, attribute, ()))
    return names


_READS_BEFORE_WAIT = _declared("READS_BEFORE_WAIT")
_TRIGGER_AFTER_WAIT = _declared("TRIGGER_AFTER_WAIT")


def test_the_kernels_declare_their_pdl_loads():
    """The declarations are read, not empty: every GEMV fusion kernel and the ops' kernels."""
    assert {
        "_gemv_residual_kernel", "_rms_norm_linear_kernel", "_rms_norm_swiglu_kernel",
        "_rms_norm_kernel", "_qk_norm_rope_kernel", "_decode_attention_kernel",
    } <= _READS_BEFORE_WAIT  # fmt: skip
    assert "_silu_mul_kernel" not in _READS_BEFORE_WAIT  # it reads only its producer's output


def test_pdl_as_compiled_waits_once_and_reads_weights_before_the_wait(compiled):
    """In the PTX of every PDL launch: one griddepcontrol.wait and one launch_dependents; the
    kernels that promise it issue global loads before the wait (the compiler kept them there);
    the trigger sits before the wait except where the kernel says otherwise."""
    pdl = [c for c in compiled if c["options"].get("launch_pdl")]
    assert {c["kernel"] for c in pdl} >= _READS_BEFORE_WAIT | {"_silu_mul_kernel"}
    for c in pdl:
        assert c["waits"] == 1 and c["triggers"] == 1, c
        if c["kernel"] in _READS_BEFORE_WAIT:
            assert c["loads_before_wait"] > 0, f"{c['kernel']}: no load before its wait"
        assert c["trigger_after_wait"] == (c["kernel"] in _TRIGGER_AFTER_WAIT), c


def test_every_engine_kernel_compiles_for_hopper(compiled):
    kernels = {c["kernel"] for c in compiled}
    from engine import fusions as registry

    for f in registry.all_fusions():
        assert set(f.kernel_names) <= kernels, (f.name, f.kernel_names, sorted(kernels))
    # The ops outside the fusions.
    assert {"_decode_attention_kernel", "_silu_mul_kernel", "_rms_norm_kernel"} <= kernels
    assert any(k.startswith("_qk_norm_rope") for k in kernels), sorted(kernels)
    assert any(c["options"].get("launch_pdl") for c in compiled), "no PDL launch compiled"
