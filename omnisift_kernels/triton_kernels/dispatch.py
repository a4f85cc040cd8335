"""Whether Triton is importable, and which path (Triton or CPU/torch) an op takes."""

from __future__ import annotations

import contextlib
import contextvars
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


# Whether ops route CPU tensors through the Triton launchers (interpreter). A context variable, not an
# environment variable: each thread (and asyncio task) has its own value, so a call that turns it on
# never changes what a concurrent call in another thread runs, and no library call writes os.environ.
_TRITON_ON_CPU: contextvars.ContextVar[bool] = contextvars.ContextVar("omnisift_triton_on_cpu", default=False)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """While active (in this thread or task only), ops on CPU tensors take their Triton path when
    ``TRITON_INTERPRET=1`` is set: ``compress(backend="triton")`` on CPU tensors, and the tests, use
    it to run the Triton kernels through the interpreter."""
    token = _TRITON_ON_CPU.set(bool(enabled))
    try:
        yield
    finally:
        _TRITON_ON_CPU.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensors living where ``t`` lives takes its Triton path.

    CUDA tensors: yes when Triton is importable. CPU tensors: only inside :func:`triton_on_cpu`
    with ``TRITON_INTERPRET=1`` set (the Triton kernels then run through the interpreter);
    otherwise the vectorized torch / C++ CPU path runs.
    """
    if not TRITON_AVAILABLE:
        return False
    if t.device.type == "cuda":
        return True
    if t.device.type == "cpu":
        return _TRITON_ON_CPU.get() and interpreting()
    return False


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()
