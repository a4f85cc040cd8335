"""Shared fixtures and markers for the test suite.

Markers (registered in pyproject.toml): ``gpu`` (skipped without CUDA), ``interpreter`` (Triton
kernels under ``TRITON_INTERPRET=1`` on the CPU; skipped if Triton is missing), ``slow``.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: derandomized (the same examples every run, so a green run stays green), no deadline (the
# Triton interpreter is slow). OMNISIFT_HYPOTHESIS_PROFILE=dev gives fresh random examples.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("OMNISIFT_HYPOTHESIS_PROFILE", "ci"))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_triton = _triton_available()
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs Triton and TRITON_INTERPRET=1 (or a CUDA device)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not (has_triton and (interpreting or has_cuda)):
            item.add_marker(skip_interp)


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def path(request):
    """Runs an op test on the torch/C++ CPU path and (under the interpreter) on the Triton path."""
    from omnisift_kernels.triton_kernels import triton_on_cpu

    with triton_on_cpu(request.param == "triton"):
        yield request.param


@pytest.fixture
def seed() -> int:
    """Seeds torch and random with a fixed value and returns it."""
    value = 1234
    torch.manual_seed(value)
    random.seed(value)
    return value


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Says how many ``gpu`` tests were skipped (no CUDA device), so a CPU run cannot pass for a
    GPU run."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "gpu" in getattr(r, "keywords", {})]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} gpu tests skipped: no CUDA device "
                                    f"(torch.cuda.is_available() is False); make test-gpu runs them on a GPU")


def _cuda_params():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cuda"]


@pytest.fixture(params=_cuda_params())
def cuda_device(request) -> torch.device:
    """Every CUDA device (``gpu`` tests; without CUDA the one ``"cuda"`` parameter is skipped)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device(request.param)
    torch.cuda.set_device(dev)
    return dev


@pytest.fixture
def device() -> torch.device:
    """The device fast paths are tested on: CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _cpu_settings_follow_the_environment():
    """After every test (and after ``monkeypatch`` restored the environment: this fixture is set up
    first, so torn down last), the extension reads its ``OMNISIFT_CPU_*`` settings again."""
    yield
    from omnisift_kernels._ext import reload_cpu_settings

    reload_cpu_settings()
