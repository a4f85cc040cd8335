"""The selector's chunk attention: every chunk's audio queries attend to its surviving video keys.

:func:`heads_attention` is the plain path (``scaled_dot_product_attention`` over the heads), used
on every device and whenever the CPU kernel does not serve. :func:`chunk_attention` is what the CPU
fast path calls: the extension's kernel (``omnisift::chunk_attention_cpu``,
``csrc/chunk_attention_cpu.cpp``) where it serves, else :func:`heads_attention`. The kernel computes
each (chunk, head) pair in register blocks straight from the projection's rows, instead of the many
small GEMM calls of ATen's CPU attention at these sizes (tens of queries, a few hundred keys); its
measurements are in ``docs/cpu.md``.

The kernel serves inference calls on CPUs where the extension runs its AVX-512 loops, with head_dim
16, 32, 48 or 64: fp32, and bf16/fp16 read in place and widened to fp32 in registers, the output
rounded back; everything else (autograd, ``torch.compile`` tracing, other CPUs) takes
:func:`heads_attention`. The reference is :func:`omnisift_kernels.reference.chunk_attention.chunk_attention`.

Environment (read at each call): ``OMNISIFT_CPU_ATTENTION``: ``auto`` (default: the kernel where
it serves) or ``sdpa`` (always :func:`heads_attention`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .._ext import ext_has_kernel

__all__ = ["chunk_attention", "heads_attention", "kernel_serves"]

_HEAD_DIMS = (16, 32, 48, 64)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _choice() -> str:
    value = os.environ.get("OMNISIFT_CPU_ATTENTION", "auto").strip().lower() or "auto"
    if value not in ("auto", "sdpa"):
        raise ValueError(f"omnisift_kernels: OMNISIFT_CPU_ATTENTION must be auto or sdpa, got {value!r}")
    return value


def kernel_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> bool:
    """Whether :func:`chunk_attention` runs the extension's kernel for these inputs (see the module
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


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
              num_heads: int) -> torch.Tensor:
    """:func:`heads_attention`, by the extension's kernel where it serves.

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


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                    num_heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention of per-chunk projected rows, by
    ``F.scaled_dot_product_attention`` (scale ``1 / sqrt(head_dim)``).

    Args:
        q: ``[C, La, E]`` projected queries; k, v: ``[C, Lv, E]`` projected keys and values (views
            are fine); head h is the h-th slice of width ``E / num_heads``.
        key_padding: bool ``[C, Lv]``, True at padding keys (left out), or None. Every chunk needs
            at least one real key (a fully padded chunk yields NaN).
        num_heads: number of heads.

    Returns:
        ``[C, La, E]`` in ``q``'s dtype: the heads' outputs side by side.
    """
    C, La, E = q.shape
    Lv = k.shape[1]
    hd = E // num_heads
    qh = q.reshape(C, La, num_heads, hd).transpose(1, 2)
    kh = k.reshape(C, Lv, num_heads, hd).transpose(1, 2)
    vh = v.reshape(C, Lv, num_heads, hd).transpose(1, 2)
    # Additive mask rather than bool: SDPA's math path treats both alike, this one is accepted by
    # every backend. -inf on padding only.
    bias = None
    if key_padding is not None:
        bias = torch.zeros(C, 1, 1, Lv, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(key_padding[:, None, None, :], float("-inf"))
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)
    return o.transpose(1, 2).reshape(C, La, E)
