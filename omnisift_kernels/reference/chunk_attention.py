"""Readable reference of the selector's chunk attention (``omnisift_kernels.ops.chunk_attention``):
softmax(q k^T / sqrt(head_dim)) v per chunk and head, written out in fp64."""

from __future__ import annotations

import math

import torch

__all__ = ["chunk_attention"]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                    num_heads: int) -> torch.Tensor:
    """float64 ``[C, La, E]``: every head's attention output, heads side by side.

    Args:
        q: ``[C, La, E]`` queries; k, v: ``[C, Lv, E]`` keys and values; head h is the h-th slice of
            width ``E / num_heads``.
        key_padding: bool ``[C, Lv]``, True at keys left out, or None.
        num_heads: number of heads.
    """
    C, La, E = q.shape
    hd = E // num_heads
    out = torch.zeros((C, La, E), dtype=torch.float64)
    for c in range(C):
        keep = slice(None) if key_padding is None else ~key_padding[c].cpu()
        for h in range(num_heads):
            cols = slice(h * hd, (h + 1) * hd)
            qh = q[c, :, cols].double().cpu()
            kh = k[c, :, cols].double().cpu()[keep]
            vh = v[c, :, cols].double().cpu()[keep]
            logits = qh @ kh.T / math.sqrt(hd)
            weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
            out[c, :, cols] = (weights / weights.sum(dim=-1, keepdim=True)) @ vh
    return out
