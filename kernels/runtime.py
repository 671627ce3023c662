"""Where kernels run: compiled on a CUDA GPU, or through Triton's interpreter on CPU.

Imported (through ``kernels/__init__``) before any ``@triton.jit`` is decorated, because
Triton reads TRITON_INTERPRET at decoration time.
"""

from __future__ import annotations

import os
import re

import torch

if not torch.cuda.is_available():
    # No GPU: run Triton kernels through the interpreter (numpy on CPU tensors).
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_name(device: torch.device | int | None = None) -> str:
    """The CUDA device's marketing name, or "cpu" when there is no GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def gpu_slug(name: str | None = None) -> str:
    """Folder-safe GPU model name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    name = gpu_name() if name is None else name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
