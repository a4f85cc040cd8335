"""Which kernel computes the selector's cross attention on the CPU fast path.

The attention of every chunk's audio queries to its surviving video keys is small next to the
projections (0.2 GFLOP at omni7b-20s), but ATen's CPU flash attention spends 2.5-3.5 ms on it in
many small MKL calls. The extension's AVX-512 kernel (``omnisift::chunk_attention_cpu``,
``csrc/selector_cpu.cpp``) computes each (chunk, head) pair in register blocks straight from the
projection's rows: 1.4-1.9 ms on the Zen 4 VM at that shape (``[10, 50, 512]`` queries, ``[10, 198,
512]`` keys and values, 8 heads), within fp32 rounding of ``scaled_dot_product_attention``.

It serves inference calls on CPUs where the extension runs its AVX-512 loops, with head_dim 16, 32,
48 or 64: fp32, and bf16/fp16 read in place and widened to fp32 in registers, the output rounded
back (3.7 ms of ATen's bf16 attention at omni7b-20s against about 2 ms); everything else (autograd,
``torch.compile`` tracing, other CPUs) goes to :func:`omnisift_kernels.selector.heads_attention`.

Environment (read at each call): ``OMNISIFT_CPU_ATTENTION``: ``auto`` (default: the kernel where
it serves) or ``sdpa`` (always ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import os

import torch

from ._ext import ext_has_kernel
from .selector import heads_attention

__all__ = ["attention", "kernel_serves"]

_HEAD_DIMS = (16, 32, 48, 64)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _choice() -> str:
    value = os.environ.get("OMNISIFT_CPU_ATTENTION", "auto").strip().lower() or "auto"
    if value not in ("auto", "sdpa"):
        raise ValueError(f"omnisift_kernels: OMNISIFT_CPU_ATTENTION must be auto or sdpa, got {value!r}")
    return value


def kernel_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> bool:
    """Whether :func:`attention` runs the extension's kernel for these inputs (see the module
    docstring); False means ``scaled_dot_product_attention``."""
    tensors = (q, k, v)
    if torch.compiler.is_compiling() or _choice() != "auto" or not ext_has_kernel("chunk_attention_cpu", "CPU"):
        return False
    if any(t.device.type != "cpu" or t.dtype not in _DTYPES or t.dtype != q.dtype or t.dim() != 3
           or t.stride(-1) != 1 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    E = q.shape[-1]
    if num_heads < 1 or E % num_heads or E // num_heads not in _HEAD_DIMS or k.stride() != v.stride():
        return False
    return bool(torch.ops.omnisift.chunk_attention_cpu_available())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
              num_heads: int) -> torch.Tensor:
    """:func:`omnisift_kernels.selector.heads_attention`, by the extension's kernel where it serves.

    Args:
        q: ``[C, La, E]`` projected queries; k, v: ``[C, Lv, E]`` projected keys and values (views
            of one ``[C, Lv, 2E]`` projection are read in place).
        key_padding: bool ``[C, Lv]``, True at padding keys, or None. Every chunk needs a real key
            (the kernel raises a ValueError otherwise).
        num_heads: number of heads.

    Returns:
        ``[C, La, E]`` in ``q``'s dtype.
    """
    if not kernel_serves(q, k, v, num_heads):
        return heads_attention(q, k, v, key_padding, num_heads)
    # fp32 output; half precision inputs are widened (exactly) as the kernel reads them, computed in
    # fp32 and rounded once, as ATen's half precision attention accumulates in fp32 and rounds its output.
    out = torch.ops.omnisift.chunk_attention_cpu(q, k, v, key_padding, num_heads)
    return out if q.dtype == torch.float32 else out.to(q.dtype)
