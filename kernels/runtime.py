"""Where kernels run, and what the GPU is called.

Triton kernels run compiled on a CUDA GPU or through Triton's interpreter on CPU tensors. The
choice is one setting, ``FUSIONGUARD_TRITON``:

- ``auto`` (default): compiled when a CUDA device is present, else interpreted;
- ``compiled`` / ``interpreted``: forced.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so the setting is resolved here,
once, when the ``kernels`` package is first imported (package initialisation runs before any
of its modules, so no file has to import anything first). An explicit ``TRITON_INTERPRET``
in the environment wins over ``auto``.

A setting that is not one of these does not fail the import (a command line could not report
it as one line then): the package runs as under ``auto`` and ``check_backend()`` raises
BackendError naming it, as does every kernel launch (``launch_checks.check_runnable_device``).
The command lines call ``check_backend()`` first, which also refuses compiled kernels on a
machine without a CUDA GPU.
"""

from __future__ import annotations

import functools
import os
import re
import sys

import torch

BACKENDS = ("auto", "compiled", "interpreted")


class BackendError(ValueError):
    """FUSIONGUARD_TRITON names no backend, or one this machine cannot run."""


def _choice() -> str:
    choice = os.environ.get("FUSIONGUARD_TRITON") or "auto"  # set but empty: auto
    if choice not in BACKENDS:
        raise BackendError(
            f"FUSIONGUARD_TRITON={choice!r}: expected one of {', '.join(BACKENDS)} "
            "(or leave it unset: auto)"
        )
    return choice


def select_backend() -> bool:
    """Decide compiled vs interpreted (True) from FUSIONGUARD_TRITON, before Triton decorates
    anything. Idempotent; the kernels package calls it first thing, and a test or program
    that imports Triton itself calls it before that import. Triton already imported in the
    other mode is an error, not a silent mix (its own library functions would be compiled-mode
    objects that the interpreter cannot call)."""
    choice = _choice()
    if choice == "auto":
        if "TRITON_INTERPRET" in os.environ:
            interpret = os.environ["TRITON_INTERPRET"] == "1"
        else:
            interpret = not torch.cuda.is_available()
    else:
        interpret = choice == "interpreted"
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    language = sys.modules.get("triton.language")
    if language is not None:
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(language.standard.sum, InterpretedFunction) != interpret:
            raise RuntimeError(
                f"triton was imported before the kernels package chose the "
                f"{'interpreted' if interpret else 'compiled'} backend: call "
                "kernels.runtime.select_backend() (or import kernels) before importing triton, "
                "or set FUSIONGUARD_TRITON / TRITON_INTERPRET in the environment"
            )
    return interpret


def _select_at_import() -> tuple[bool, str | None]:
    """select_backend(), or auto's choice and the message when the setting is unknown."""
    try:
        return select_backend(), None
    except BackendError as exc:
        saved = os.environ.pop("FUSIONGUARD_TRITON")
        try:
            return select_backend(), str(exc)
        finally:
            os.environ["FUSIONGUARD_TRITON"] = saved


INTERPRETING, SETTING_ERROR = _select_at_import()


def check_backend() -> None:
    """Raise BackendError, naming the setting and the fix, if FUSIONGUARD_TRITON is unknown or
    asks for compiled kernels on a machine without a CUDA GPU."""
    if SETTING_ERROR is not None:
        raise BackendError(SETTING_ERROR)
    if not INTERPRETING and not torch.cuda.is_available():
        how = os.environ.get("FUSIONGUARD_TRITON", "auto")
        given = "TRITON_INTERPRET=0" if how == "auto" else f"FUSIONGUARD_TRITON={how}"
        raise BackendError(
            f"{given} asks for compiled Triton kernels, but there is no CUDA GPU: set "
            "FUSIONGUARD_TRITON=interpreted (or unset it) to run them through the interpreter"
        )


def backend() -> str:
    """ "interpreted" (Triton's interpreter on CPU tensors) or "compiled" (CUDA)."""
    return "interpreted" if INTERPRETING else "compiled"


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


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a persistent grid's size)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def pdl_options(use_pdl: bool) -> dict:
    """Launch options for a kernel that waits with ``gdc_wait`` (Hopper PDL) or not."""
    return {"launch_pdl": True} if use_pdl else {}
