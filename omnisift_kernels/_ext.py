"""Loads the compiled extension ``omnisift_kernels._C`` if it was built.

Importing this module never fails: without the extension (``OMNISIFT_BUILD_EXT=0`` installs, or a
failed load) it warns once and every public op falls back to pure PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

EXT_AVAILABLE: bool = False
EXT_ERROR: str | None = None

try:  # the .so registers the ops of the ``omnisift`` namespace with TORCH_LIBRARY on import
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        raise ModuleNotFoundError("the extension was not built (OMNISIFT_BUILD_EXT=0, or no build yet)")
    from . import _C  # type: ignore[attr-defined]  # noqa: F401

    EXT_AVAILABLE = True
except Exception as exc:  # not built, or an ABI mismatch with the installed torch
    EXT_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "omnisift_kernels: the compiled extension omnisift_kernels._C is not available "
        f"({EXT_ERROR}); using pure-PyTorch fallbacks for its ops.",
        RuntimeWarning,
        stacklevel=2,
    )


@functools.lru_cache(maxsize=None)
def ext_has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the extension registered ``omnisift::<op_name>`` for ``dispatch_key`` ("CPU"/"CUDA").
    Cached: the extension registers everything when it loads, at import."""
    if not EXT_AVAILABLE:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"omnisift::{op_name}", dispatch_key)
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _has_block_cache() -> bool:
    """The extension's cache of freed CPU blocks and its allocator scope (``csrc/cpu_alloc.h``)."""
    return EXT_AVAILABLE and torch._C._dispatch_has_kernel("omnisift::cpu_allocator_scope")


@contextlib.contextmanager
def cpu_block_cache(enabled: bool = True):
    """While active, torch's CPU allocator takes blocks of 256 KiB or more from the extension's cache of
    freed blocks (``csrc/cpu_alloc.h``; ``OMNISIFT_CPU_OUTPUT_CACHE_MB=0`` turns it off): the fast
    path's intermediates (GEMM outputs, normalised rows) and outputs then reuse memory that is
    already mapped instead of faulting fresh pages, whatever ran in between. A no-op without the
    extension and under ``torch.compile`` tracing."""
    with _block_cache_toggle("cpu_allocator_scope", enabled):
        yield


@contextlib.contextmanager
def outside_cpu_block_cache():
    """Suspends an open :func:`cpu_block_cache` (torch's own allocator is back meanwhile): for memory
    that outlives the call and is freed with whatever allocator is current then (oneDNN's buffers)."""
    with _block_cache_toggle("cpu_allocator_suspend"):
        yield


@contextlib.contextmanager
def _block_cache_toggle(op_name: str, enabled: bool = True):
    """``omnisift::<op_name>(True)`` for the block, ``(False)`` after it (also on errors); nothing
    without the extension, under ``torch.compile`` tracing or when not ``enabled``."""
    if not enabled or torch.compiler.is_compiling() or not _has_block_cache():
        yield
        return
    op = getattr(torch.ops.omnisift, op_name)
    op(True)
    try:
        yield
    finally:
        op(False)


def reload_cpu_settings() -> None:
    """Makes the extension read its ``OMNISIFT_CPU_*`` environment variables again.

    The extension reads them once, at first use (``csrc/cpu_settings.h``): its kernels and allocation
    path never call ``getenv``. A process (or a test) that changes them at run time calls this after.
    """
    if EXT_AVAILABLE and hasattr(torch.ops.omnisift, "reload_cpu_settings"):
        torch.ops.omnisift.reload_cpu_settings()
