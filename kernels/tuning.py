"""Tuned launch tables, one per kernel and GPU model: kernels/configs/<kernel>/<gpu-slug>.json.

A table is written by ``python -m profiling.tune`` from real runs on that GPU model and read on
a kernel's first call with a given shape; nothing autotunes at run time. Under the interpreter
no table applies (its blocks are sized for the interpreter). Layout::

    {"gpu": ..., "gpu_slug": ..., "torch": ..., "triton": ..., "date": ..., "method": ...,
     "configs": {"<N>x<K>": {"<dtype>": {"<M bucket>": {<the kernel's config fields>}}}},
     "timings": {... the same keys: best and heuristic µs per call ...}}

Rows M are bucketed by the next power of two; an M between two tuned buckets takes the next
larger bucket's configuration. An M beyond the largest tuned bucket gets no entry (the
kernel's heuristic): a table tuned at decode sizes only must not send a prefill to a GEMV.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from kernels.runtime import INTERPRETING, gpu_slug

CONFIG_DIR = Path(__file__).with_name("configs")

_overrides: dict[str, object] = {}


def m_bucket(M: int) -> int:
    """The tuned-table bucket of M rows: the next power of two."""
    return 1 << max(0, (M - 1).bit_length())


def dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table_path(kernel: str, slug: str | None = None) -> Path:
    return CONFIG_DIR / kernel / f"{gpu_slug() if slug is None else slug}.json"


@functools.cache
def load_table(kernel: str, slug: str) -> dict:
    """The committed table of ``kernel`` for GPU ``slug`` ({} when there is none)."""
    path = table_path(kernel, slug)
    return json.loads(path.read_text()) if path.exists() else {}


def tuned(kernel: str, N: int, K: int, dtype: torch.dtype, M: int) -> dict | None:
    """The tuned configuration fields for this call, or None (untuned shape, interpreter)."""
    if INTERPRETING:
        return None
    by_m = load_table(kernel, gpu_slug()).get("configs", {}).get(f"{N}x{K}", {})
    by_m = by_m.get(dtype_key(dtype))
    if not by_m:
        return None
    bucket = m_bucket(M)
    chosen = min((int(b) for b in by_m if int(b) >= bucket), default=None)
    return None if chosen is None else by_m[str(chosen)]


@contextlib.contextmanager
def use_config(kernel: str, config: object | None) -> Iterator[None]:
    """Force every call of ``kernel`` inside the block to use ``config`` (the tuner, and
    planted regressions in the gate's own tests)."""
    previous = _overrides.get(kernel)
    _overrides[kernel] = config
    try:
        yield
    finally:
        _overrides[kernel] = previous


def override(kernel: str) -> object | None:
    """The configuration forced by ``use_config`` for ``kernel``, if any."""
    return _overrides.get(kernel)
