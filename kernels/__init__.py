"""Triton kernels. Importing this package first picks compiled or interpreted execution."""

from kernels.runtime import INTERPRETING, gpu_name, gpu_slug

__all__ = ["INTERPRETING", "gpu_name", "gpu_slug"]
