"""Triton kernels and the bottom layer every other package builds on.

Each kernel file holds its ``@triton.jit`` kernel(s), a launcher that checks its inputs, and
the plain torch references. ``kernels.runtime`` decides compiled vs interpreted execution
(``FUSIONGUARD_TRITON``) and names the GPU; ``kernels.markers`` holds the NVTX /
torch.profiler markers; ``kernels.tuning`` reads the tuned launch tables.
"""

from kernels.runtime import INTERPRETING, backend, gpu_name, gpu_slug

__all__ = ["INTERPRETING", "backend", "gpu_name", "gpu_slug"]
