"""One marker = an NVTX push/pop range in the ``fusionguard`` domain + a torch.profiler
``record_function`` with the same name (docs/definitions.md, "Markers").

Nsight Systems / Nsight Compute see the NVTX range (``ncu --nvtx --nvtx-include
"fusionguard@o_proj_residual/"``); torch.profiler sees the record_function, which is what
profiling/launches.py attributes kernels to. Both are skipped cheaply when nothing listens:
the nvtx package is a no-op without an attached tool, and record_function is only entered
while a torch profiler is running. ``set_markers_enabled(False)`` (or FUSIONGUARD_MARKERS=0)
turns both off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    import nvtx as _nvtx
except ImportError:  # markers still reach torch.profiler without the nvtx package
    _nvtx = None

DOMAIN = "fusionguard"

_enabled = os.environ.get("FUSIONGUARD_MARKERS", "1") != "0"
_domain = _nvtx.get_domain(DOMAIN) if _nvtx is not None else None
_attributes: dict[str, object] = {}


def set_markers_enabled(enabled: bool) -> None:
    """Switch all markers on or off (process-wide)."""
    global _enabled
    _enabled = bool(enabled)


def markers_enabled() -> bool:
    return _enabled


def nvtx_available() -> bool:
    return _domain is not None


def _nvtx_attributes(name: str):
    attrs = _attributes.get(name)
    if attrs is None:
        attrs = _attributes[name] = _domain.get_event_attributes(message=name)
    return attrs


@contextlib.contextmanager
def mark(name: str) -> Iterator[None]:
    """Mark a step (``decode_step``, ``layer.3``, ``o_proj_residual``...) for NVTX and
    torch.profiler."""
    if not _enabled:
        yield
        return
    if _domain is not None:
        _domain.push_range(_nvtx_attributes(name))
    record = None
    if torch.autograd._profiler_enabled():
        record = torch.autograd.profiler.record_function(name)
        record.__enter__()
    try:
        yield
    finally:
        if record is not None:
            record.__exit__(None, None, None)
        if _domain is not None:
            _domain.pop_range()
