"""Where kernels run: compiled on a CUDA GPU, or through Triton's interpreter on CPU.

Imported (through ``kernels/__init__``) before any ``@triton.jit`` is decorated, because
Triton reads TRITON_INTERPRET at decoration time.
"""

from __future__ import annotations

import functools
import os
import re

import torch

if not torch.cuda.is_available():
    # No GPU: run Triton kernels through the interpreter (numpy on CPU tensors).
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

import triton  # noqa: E402  (after TRITON_INTERPRET is settled)


def gpu_name(device: torch.device | int | None = None) -> str:
    """The CUDA device's marketing name, or "cpu" when there is no GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def gpu_slug(name: str | None = None) -> str:
    """Folder-safe GPU model name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    name = gpu_name() if name is None else name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol): compiled, on Hopper or newer."""
    return (
        not INTERPRETING
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


# --------------------------------------------------------------------------------------------
# Launching compiled kernels with less host time
# --------------------------------------------------------------------------------------------

# FUSIONGUARD_TRITON_LAUNCH=jit sends every launch through Triton's own path (for debugging).
FAST_LAUNCH: bool = os.environ.get("FUSIONGUARD_TRITON_LAUNCH", "fast") != "jit"
# (kernel, grid, device, argument key) -> (launcher, function, packed metadata, constexpr tail)
_compiled_launches: dict[tuple, tuple] = {}
_BY_VALUE = (int, type(None))  # keyed by value (bool is an int)


def _arg_key(arg: object) -> object:
    """What Triton specializes a launch on, per argument.

    Tensors: dtype and 16-byte alignment of the data pointer (Triton's pointer specialization);
    ints and bools: the value itself (covers Triton's ==1 and %16 integer specializations, and
    more); floats: only the type (Triton passes them as fp32 unspecialized). Anything else
    (e.g. a TMA descriptor) has no key: such launches always take Triton's own path.
    """
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, _BY_VALUE):
        return arg
    if isinstance(arg, float):
        return float
    raise TypeError


_runtime_knobs = getattr(getattr(triton, "knobs", None), "runtime", None)


def _launch_hooks_set() -> bool:
    """A launch hook (e.g. a Triton profiler's) is installed: it needs Triton's own path.
    Newer Triton keeps the hooks in a HookChain that is never None: empty means none."""
    if _runtime_knobs is None:
        return False
    for hook in (_runtime_knobs.launch_enter_hook, _runtime_knobs.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def launch(kernel, grid: tuple[int, ...], *args, key: object = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with less host time on repeat calls.

    Eager decode launches ~10 kernels per layer per token, and Triton's Python launch path
    (binder, specialization, cache key, options) costs more host time than the launch itself.
    The first call with a given argument key takes that path and keeps the compiled kernel;
    later calls with the same key (the same specialization, so the same binary) hand the
    arguments straight to the compiled kernel's launcher. ``args`` are the kernel's leading
    parameters in order; ``kwargs`` hold every remaining parameter (the constexprs) by name and
    the launch options (num_warps, num_stages, launch_pdl). Under the interpreter, with launch
    hooks installed (e.g. a Triton profiler), or for arguments without a key, this is exactly
    ``kernel[grid](*args, **kwargs)``.

    ``key``: a caller that already holds a hashable fixing everything Triton specializes on
    (its checked call signature plus the alignment of its tensors) passes it, and the
    per-argument key is skipped.
    """
    if INTERPRETING or not FAST_LAUNCH:
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    if key is not None:
        key = (kernel, grid, device, key)
    else:
        try:
            key = (kernel, grid, device, *map(_arg_key, args), *kwargs.items())
        except TypeError:  # an argument without a key
            kernel[grid](*args, **kwargs)
            return
    hit = _compiled_launches.get(key)
    if hit is None or _launch_hooks_set():
        compiled = kernel[grid](*args, **kwargs)
        params = kernel.arg_names[len(args) :]
        missing = [name for name in params if name not in kwargs]
        if missing:
            raise TypeError(f"launch({kernel.fn.__name__}): parameters {missing} not given by name")
        if len(_compiled_launches) > 4096:
            _compiled_launches.clear()
        constexpr_tail = tuple(kwargs[name] for name in params)
        _compiled_launches[key] = (
            compiled.run,
            compiled.function,
            compiled.packed_metadata,
            constexpr_tail,
        )
        return
    run, function, metadata, constexpr_tail = hit
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    # (launch metadata, enter hook, exit hook): None, as Triton passes them with no hooks set
    run(grid[0], grid_1, grid_2, stream, function, metadata, None, None, None,
        *args, *constexpr_tail)  # fmt: skip
