"""kernels.runtime: compiled vs interpreted Triton from FUSIONGUARD_TRITON, resolved when the
kernels package is first imported, and the GPU's folder-safe name. The environment cases run
in fresh interpreters (the choice is made once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import runtime
from kernels.runtime import INTERPRETING, backend, gpu_name, gpu_slug

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA H200", "nvidia-h200"),
        ("NVIDIA A100-SXM4-80GB", "nvidia-a100-sxm4-80gb"),
        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
        ("NVIDIA RTX 6000 Ada Generation", "nvidia-rtx-6000-ada-generation"),
        ("  Tesla T4 ", "tesla-t4"),
        ("NVIDIA H100 PCIe (MIG 1g.10gb)", "nvidia-h100-pcie-mig-1g-10gb"),
        ("cpu", "cpu"),
    ],
)
def test_gpu_slug_examples(name, slug):
    assert gpu_slug(name) == slug


def test_gpu_slug_defaults_to_this_machine():
    assert gpu_slug() == gpu_slug(gpu_name())
    if not torch.cuda.is_available():
        assert gpu_name() == "cpu" and gpu_slug() == "cpu"


def test_backend_matches_interpreting():
    assert backend() == ("interpreted" if INTERPRETING else "compiled")
    assert kernels.backend is backend and kernels.INTERPRETING is INTERPRETING
    # The resolved choice is what Triton reads when a kernel is decorated.
    assert (os.environ.get("TRITON_INTERPRET") == "1") == INTERPRETING
    assert runtime.pdl_options(False) == {}
    if INTERPRETING:
        assert not runtime.pdl_supported(torch.device("cpu"))


def _python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root; ``None`` unsets a
    variable. FUSIONGUARD_TRITON and TRITON_INTERPRET start unset unless given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("FUSIONGUARD_TRITON", "TRITON_INTERPRET"):
        env.pop(name, None)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


REPORT = (
    "import os, kernels; from kernels.runtime import backend; "
    "print(backend(), os.environ['TRITON_INTERPRET'])"
)


def test_unknown_setting_is_a_clear_error_when_checked_and_at_the_first_launch():
    """The import goes on as under auto (a command line can then report it in one line);
    check_backend() and any launch raise BackendError naming the setting."""
    code = (
        "import torch, kernels\n"
        "from kernels.runtime import BackendError, check_backend\n"
        "from kernels.rms_norm import rms_norm\n"
        "for call in (check_backend, lambda: rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)):\n"
        "    try:\n"
        "        call()\n"
        "    except BackendError as exc:\n"
        "        print('raised:', exc)\n"
    )
    proc = _python(code, FUSIONGUARD_TRITON="bogus")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert "FUSIONGUARD_TRITON='bogus'" in line
        assert "expected one of auto, compiled, interpreted" in line


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FUSIONGUARD_TRITON": "interpreted"}, "interpreted 1"),
        # an explicit choice wins over TRITON_INTERPRET
        ({"FUSIONGUARD_TRITON": "interpreted", "TRITON_INTERPRET": "0"}, "interpreted 1"),
        ({"FUSIONGUARD_TRITON": "compiled", "TRITON_INTERPRET": "1"}, "compiled 0"),
        # under auto, an explicit TRITON_INTERPRET wins
        ({"FUSIONGUARD_TRITON": "auto", "TRITON_INTERPRET": "1"}, "interpreted 1"),
        ({"TRITON_INTERPRET": "0"}, "compiled 0"),
    ],
    ids=["interpreted", "interpreted-over-0", "compiled-over-1", "auto-1", "auto-0"],
)
def test_setting_resolves_the_backend(env, expected):
    proc = _python(REPORT, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_auto_follows_cuda():
    proc = _python(REPORT)
    assert proc.returncode == 0, proc.stderr
    cuda = torch.cuda.is_available()
    assert proc.stdout.strip() == ("compiled 0" if cuda else "interpreted 1")


def test_importing_a_kernel_module_first_resolves_the_backend():
    """``import kernels.rms_norm`` as the first import of a fresh process: the package's
    initialisation resolves the backend before the module's kernels are decorated, so they are
    interpreted exactly when the backend is, and the kernel runs on this machine's device."""
    code = """
import kernels.rms_norm as mod
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from kernels.runtime import backend

jitted = [v for v in vars(mod).values() if isinstance(v, (JITFunction, InterpretedFunction))]
assert jitted, "no Triton kernel found in kernels.rms_norm"
kinds = {isinstance(v, InterpretedFunction) for v in jitted}
assert kinds == {backend() == "interpreted"}, (backend(), jitted)
device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(3, 64, device=device)
w = 1 + 0.3 * torch.randn(64, device=device)
torch.testing.assert_close(mod.rms_norm(x, w, 1e-6), mod.rms_norm_reference(x, w, 1e-6))
print(backend())
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("compiled" if torch.cuda.is_available() else "interpreted")
