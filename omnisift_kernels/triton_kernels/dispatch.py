"""Whether Triton is importable, and which path (Triton or CPU/torch) an op takes."""

from __future__ import annotations

import os

import torch

TRITON_AVAILABLE: bool = False
TRITON_ERROR: str | None = None
try:  # pragma: no branch
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    TRITON_AVAILABLE = True
except Exception as exc:  # ImportError, or a broken install
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensors living where ``t`` lives takes its Triton path.

    CUDA tensors: yes when Triton is importable. CPU tensors: only when both
    ``OMNISIFT_TRITON_ON_CPU=1`` and ``TRITON_INTERPRET=1`` are set (the tests use this to run the
    Triton kernels through the interpreter); otherwise the vectorized torch CPU path runs.
    The environment is read on every call, so tests may toggle it.
    """
    if not TRITON_AVAILABLE:
        return False
    if t.device.type == "cuda":
        return True
    if t.device.type == "cpu":
        return os.environ.get("OMNISIFT_TRITON_ON_CPU", "0") == "1" and interpreting()
    return False


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()
