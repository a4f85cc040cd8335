"""Readable references of the variable-length ops (``omnisift_kernels.ops.varlen``): boolean
indexing and per-row Python loops in plain PyTorch."""

from __future__ import annotations

import torch

__all__ = ["varlen_compact", "varlen_gather", "varlen_pad", "varlen_scatter"]


def varlen_compact(x: torch.Tensor, keep: torch.Tensor, position_ids: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict:
    """The kept rows of ``x [B, L, ...]`` packed in row-major order (flash-attn varlen).

    Returns:
        dict with ``packed [T, ...]``, ``indices`` int64 ``[T]`` (flat ``b*L + l``), ``cu_seqlens`` int32
        ``[B+1]``, ``max_seqlen`` (int), and ``position_ids [..., T]`` / ``labels [T]`` when given.
    """
    flat = keep.flatten()
    seqlens = keep.sum(1)
    out = {
        "packed": x.flatten(0, 1)[flat],
        "indices": flat.nonzero().flatten(),
        "cu_seqlens": torch.nn.functional.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32),
        "max_seqlen": int(seqlens.max()) if keep.shape[0] > 0 else 0,
    }
    if position_ids is not None:
        out["position_ids"] = position_ids.flatten(-2)[..., flat]
    if labels is not None:
        out["labels"] = labels.flatten()[flat]
    return out


def varlen_pad(x: torch.Tensor, keep: torch.Tensor, side: str, pad_value, position_ids=None, position_pad=0,
               labels=None, label_pad=-100):
    """The kept rows of each batch row, padded to the longest row on ``side`` ("right"/"left").

    Returns:
        ``(padded [B, W, D], attention_mask int64 [B, W], position_ids [..., B, W] or None,
        labels [B, W] or None, W)``.
    """
    B, L, D = x.shape
    lens = [int(k.sum()) for k in keep]
    W = max(lens) if lens else 0
    padded = torch.full((B, W, D), pad_value, dtype=x.dtype)
    mask = torch.zeros(B, W, dtype=torch.int64)
    pos = None if position_ids is None else torch.full(position_ids.shape[:-2] + (B, W), position_pad,
                                                      dtype=position_ids.dtype)
    lab = None if labels is None else torch.full((B, W), label_pad, dtype=labels.dtype)
    for b in range(B):
        n = lens[b]
        sl = slice(0, n) if side == "right" else slice(W - n, W)
        padded[b, sl] = x[b][keep[b]]
        mask[b, sl] = 1
        if pos is not None:
            pos[..., b, sl] = position_ids[..., b, :][..., keep[b]]
        if lab is not None:
            lab[b, sl] = labels[b][keep[b]]
    return padded, mask, pos, lab, W


def varlen_scatter(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int, fill=0) -> torch.Tensor:
    """``[batch, seqlen, ...]`` filled with ``fill``, row ``indices[j]`` (flat) set to ``packed[j]``;
    indices outside ``[0, batch*seqlen)`` are skipped."""
    out = torch.full((batch * seqlen,) + tuple(packed.shape[1:]), fill, dtype=packed.dtype)
    for j, i in enumerate(indices.tolist()):
        if 0 <= i < batch * seqlen:
            out[i] = packed[j]
    return out.view((batch, seqlen) + tuple(packed.shape[1:]))


def varlen_gather(src: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``src[indices]`` row by row (a Python loop); indices outside ``[0, N)`` give zero rows."""
    N = src.shape[0]
    rows = [src[i] if 0 <= i < N else torch.zeros_like(src[0:1])[0] for i in indices.tolist()]
    return torch.stack(rows) if rows else src.new_empty((0,) + tuple(src.shape[1:]))
