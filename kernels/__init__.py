"""Triton kernels and the bottom layer every other package builds on.

Each kernel file holds its ``@triton.jit`` kernel(s), a launcher that checks its inputs, and
the plain torch references. ``kernels.runtime`` decides compiled vs interpreted execution
(``FUSIONGUARD_TRITON``) and names the GPU; ``kernels.markers`` holds the NVTX /
torch.profiler markers; ``kernels.tuning`` reads the tuned launch tables.

The kernels have no backward: a launcher refuses an input that requires grad while grad mode
is on (``kernels.launch_checks.check_no_grad``) instead of returning an output cut off from
the autograd graph; call them under ``torch.no_grad()`` or ``torch.inference_mode()``.
"""

from kernels.runtime import INTERPRETING, backend, gpu_name, gpu_slug

__all__ = ["INTERPRETING", "backend", "gpu_name", "gpu_slug"]
