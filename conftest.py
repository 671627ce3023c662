"""Suite-wide set-up: compiled or interpreted Triton, markers, seeds, GPU name for
pytest-benchmark."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from kernels.runtime import select_backend

# Before any test module imports triton: the interpreter on a machine without a GPU
# (FUSIONGUARD_TRITON overrides).
select_backend()

HAS_GPU = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption(
        "--seed",
        type=int,
        default=None,
        help="base seed for every test's RNG (default: FUSIONGUARD_SEED, else fresh each run)",
    )


def _base_seed(config) -> int:
    seed = config.getoption("--seed")
    if seed is None and os.environ.get("FUSIONGUARD_SEED"):
        seed = int(os.environ["FUSIONGUARD_SEED"])
    if seed is None:
        # Fresh inputs every run (a kernel must be right on any valid input), but printed
        # in the header so that a failure can be replayed with --seed.
        seed = random.SystemRandom().randrange(2**31)
    return seed


def pytest_configure(config):
    config._fusionguard_seed = _base_seed(config)


def pytest_report_header(config):
    from kernels.runtime import backend

    mode = f"CUDA ({torch.cuda.get_device_name()})" if HAS_GPU else "CPU"
    mode += f", Triton {backend()}"
    return [
        f"fusionguard: base seed {config._fusionguard_seed} (replay with --seed); "
        f"kernels on {mode}",
    ]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (on CPU the suite runs Triton kernels through the interpreter; "
        "run this on a GPU runner: tox -e gpu)"
    )
    # pytest-xdist workers share the GPU: a time measured there is not this code's time.
    skip_timing = pytest.mark.skip(
        reason="a timing test: skipped inside pytest-xdist workers, which share the GPU "
        "(tox -e gpu runs the timing tests serially afterwards: pytest -m timing)"
    )
    in_worker = os.environ.get("PYTEST_XDIST_WORKER") is not None
    for item in items:
        # markers, not keywords: a test id such as "bench" or "gpu" is no marker
        if not HAS_GPU and item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
        elif in_worker and (item.get_closest_marker("timing") or item.get_closest_marker("bench")):
            item.add_marker(skip_timing)


@pytest.fixture(autouse=True)
def seeded_rng(request) -> int:
    """Seed torch and random per test: base seed mixed with the test id."""
    seed = (request.config._fusionguard_seed + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_GPU else "cpu")


def pytest_benchmark_update_machine_info(config, machine_info):
    from kernels.runtime import gpu_name, gpu_slug

    machine_info["gpu"] = gpu_name()
    machine_info["gpu_slug"] = gpu_slug()
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    if HAS_GPU:
        machine_info["cuda"] = torch.version.cuda
