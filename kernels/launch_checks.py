"""Input checks and launch arithmetic shared by the kernels' launchers. Cheap on purpose: they
run on every eager decode step, so they compare attributes and never touch tensor data (no
host sync).

The Triton kernels have no backward: an input that requires grad while grad mode is on is an
error naming it (run under ``torch.no_grad()`` or ``torch.inference_mode()``, or pass
``t.detach()``), rather than an output silently cut from the autograd graph."""

from __future__ import annotations

import torch

from kernels import runtime
from kernels.runtime import INTERPRETING

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    name: str,
    t: object,
    *,
    dim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    last_dim_contiguous: bool = True,
) -> torch.Tensor:
    """Raise an error naming ``name`` unless ``t`` is a tensor that the kernel can take."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_no_grad(name, t)
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {allowed}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}: one device for all inputs")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride {t.stride(-1)} != 1)"
        )
    return t


def check_no_grad(name: str, t: torch.Tensor) -> None:
    """The kernels have no backward: refuse an input that autograd would track."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but the Triton kernel has no backward: call it under "
            f"torch.no_grad() or torch.inference_mode(), or pass {name}.detach()"
        )


def check_backend_setting() -> None:
    """FUSIONGUARD_TRITON must name a backend (kernels.runtime)."""
    if runtime.SETTING_ERROR is not None:
        raise runtime.BackendError(runtime.SETTING_ERROR)


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != reference.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}: "
                "they must match"
            )


def check_runnable_device(name: str, t: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter (no GPU) needs CPU tensors."""
    check_backend_setting()
    if t.device.type == "cuda" and INTERPRETING:
        raise RuntimeError(
            f"{name} is on CUDA but Triton runs interpreted (FUSIONGUARD_TRITON=interpreted or "
            "TRITON_INTERPRET=1): set FUSIONGUARD_TRITON=compiled to run compiled kernels"
        )
    if t.device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"{name} is on {t.device}: compiled kernels need CUDA tensors (set "
            "FUSIONGUARD_TRITON=interpreted before importing kernels, to interpret on CPU)"
        )


def rows_view(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] -> [rows, width] without a copy (the kernel writes through it)."""
    try:
        return t.view(-1, width)
    except RuntimeError:
        raise ValueError(
            f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed as "
            f"[rows, {width}]: pass a tensor whose leading dims can be flattened"
        ) from None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def memory_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that ``t`` may touch."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return (t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size())


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = memory_span(a), memory_span(b)
    return a0 < b1 and b0 < a1


def check_32bit_indexing(**matrices: torch.Tensor) -> None:
    """Offsets are int32 in the kernels: every 2-D operand must span < 2**31 elements."""
    for name, t in matrices.items():
        (rows, cols), (row_stride, col_stride) = t.shape, t.stride()
        if (rows - 1) * abs(row_stride) + (cols - 1) * abs(col_stride) >= 2**31:
            raise ValueError(f"{name} spans more than 2**31 elements: 32-bit indexing overflows")
