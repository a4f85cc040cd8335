"""Variable-length compaction: drop masked tokens and pack (or re-pad) the rest.

Public functions:

* :func:`varlen_compact`: ``x [B, L, D]`` + ``keep [B, L]`` -> packed ``[T, D]`` in flash-attn's
  ``unpad_input`` convention (``indices`` into the flattened ``B*L``, ``cu_seqlens``, ``max_seqlen``),
  gathering position ids and labels in the same pass.
* :func:`varlen_pad`: the kept tokens of every row, right- or left-padded to the longest kept row.
* :func:`varlen_scatter`: the inverse of :func:`varlen_compact` (``[T, D]`` -> ``[B, L, D]``).
* :func:`varlen_gather`: rows of ``[N, D]`` by index (the backward of :func:`varlen_scatter`).

Registered ops (``torch.library.custom_op``; eager, ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck`` all work; autograd: compact's backward is scatter, scatter's is gather):
``omnisift::varlen_compact_op``, ``omnisift::varlen_scatter_op``, ``omnisift::varlen_gather_op``.
Their implementation calls the C++/CUDA ops ``omnisift::varlen_compact``, ``omnisift::varlen_scatter``
and ``omnisift::varlen_gather`` of the extension ``omnisift_kernels._C`` when it has a kernel for the
tensor's device, else a pure-PyTorch fallback giving bit-identical results (every op only copies).

Host syncs: :func:`varlen_compact` without ``total`` reads ``(T, max_seqlen)`` from the device in ONE
copy to allocate its outputs; with a host-known ``total`` it never syncs (``max_seqlen`` is then a
0-dim device tensor). :func:`varlen_pad` reads ``(T, max_seqlen)`` in one copy unless both ``total``
and ``max_seqlen`` are given. :func:`varlen_scatter` / :func:`varlen_gather` never sync.

``total`` validation: on the CPU a wrong ``total`` always raises ``ValueError`` (the count is on the
host anyway). On CUDA it is only checked in validation mode (``OMNISIFT_VALIDATE=1`` in the
environment, or :func:`set_validation`), which costs one sync; otherwise a wrong ``total`` is
memory-safe but gives wrong results (rows past the real count are zero with index -1; a too-small
total truncates).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .. import _ext
from .._validation import check_compact_inputs, check_same_device, check_size, check_tensor

__all__ = [
    "PackedBatch",
    "PaddedBatch",
    "set_validation",
    "varlen_compact",
    "varlen_gather",
    "varlen_pad",
    "varlen_scatter",
]

# Module switch for tests / debugging: True forces the pure-PyTorch fallback even with the extension.
FORCE_FALLBACK: bool = False
_VALIDATE: bool = os.environ.get("OMNISIFT_VALIDATE", "0") not in ("", "0", "false", "False")


def set_validation(enabled: bool) -> None:
    """Checks a caller-given ``total`` against the real count on CUDA too (one host sync per call)."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


class PackedBatch(NamedTuple):
    """Result of :func:`varlen_compact` (flash-attn ``unpad_input`` convention).

    Attributes:
        packed: ``[T, D]``, ``x.dtype``: the kept tokens in row-major order of ``(b, l)``.
        indices: ``[T]`` int64: flat index ``b * L + l`` of every packed token.
        cu_seqlens: ``[B + 1]`` int32: ``cu_seqlens[b]`` = first packed row of batch row ``b``.
        max_seqlen: the longest kept row: a Python ``int`` when ``total`` was not given, else a 0-dim
            int32 tensor on the device (computing an int would need a host sync).
        position_ids: ``[3, T]`` (``[K, T]``, or ``[T]`` for ``[B, L]`` input), input dtype; None if not given.
        labels: ``[T]``, input dtype; None if not given.
    """

    packed: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int | torch.Tensor
    position_ids: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]


class PaddedBatch(NamedTuple):
    """Result of :func:`varlen_pad`.

    Attributes:
        padded: ``[B, W, D]``, ``x.dtype``, ``W = max_seqlen``: row ``b`` holds its kept tokens in order,
            right- or left-aligned, the rest is ``pad_value``.
        attention_mask: ``[B, W]`` int64 (Hugging Face convention): 1 for real tokens, 0 for padding.
        position_ids: ``[3, B, W]`` (``[K, B, W]`` or ``[B, W]`` like the input), padding = ``position_pad``;
            None if not given.
        labels: ``[B, W]``, padding = ``label_pad``; None if not given.
        indices: ``[T]`` int64 flat index ``b * L + l`` (into the input) of every kept token (packed order).
        cu_seqlens: ``[B + 1]`` int32 kept-row offsets.
        max_seqlen: ``W`` (Python int).
        pad_indices: ``[T]`` int64 flat index ``b * W + w`` (into ``padded``) of every kept token.
    """

    padded: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pad_indices: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Backend choice


def _use_ext(op_name: str, t: torch.Tensor) -> bool:
    if FORCE_FALLBACK:
        return False
    if t.device.type == "cpu":
        key = "CPU"
    elif t.device.type == "cuda":
        key = "CUDA"
    else:
        return False
    return _ext.ext_has_kernel(op_name, key)


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch fallbacks (bit-identical to the C++/CUDA kernels: they only copy)


def _gather_fallback(src: torch.Tensor, indices: torch.Tensor, checked: bool = True) -> torch.Tensor:
    """out[t] = src[indices[t]] along dim 0; invalid indices give zeros (if ``checked``)."""
    n = src.shape[0]
    if n == 0:
        return src.new_zeros((indices.shape[0],) + tuple(src.shape[1:]))
    if not checked:
        return src.index_select(0, indices)
    valid = (indices >= 0) & (indices < n)
    out = src.index_select(0, indices.clamp(0, n - 1))
    return torch.where(valid.view((-1,) + (1,) * (src.dim() - 1)), out, torch.zeros((), dtype=src.dtype,
                                                                                    device=src.device))


def _compact_fallback(x, keep, position_ids, labels, total):
    B, L, D = x.shape
    counts = keep.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
    cu[1:] = counts.cumsum(0)
    if total is None:
        if B > 0:
            T, max_len = (int(v) for v in torch.stack([counts.sum(), counts.max()]).tolist())  # the one sync
        else:
            T, max_len = 0, 0
        checked = False
    else:
        T, max_len = int(total), -1
        checked = True
    indices = torch.nonzero_static(keep.reshape(-1), size=T, fill_value=-1).reshape(-1)
    packed = _gather_fallback(x.reshape(B * L, D), indices, checked)
    if position_ids is not None:
        p3 = position_ids.unsqueeze(0) if position_ids.dim() == 2 else position_ids
        pos = _gather_fallback(p3.reshape(p3.shape[0], B * L).t(), indices, checked).t().contiguous()
        pos_out = pos.squeeze(0) if position_ids.dim() == 2 else pos
    else:
        pos_out = torch.empty(0, dtype=torch.int64, device=x.device)
    if labels is not None:
        lab_out = _gather_fallback(labels.reshape(B * L), indices, checked)
    else:
        lab_out = torch.empty(0, dtype=torch.int64, device=x.device)
    return packed, indices, cu, max_len, pos_out, lab_out


def _scatter_fallback(packed, indices, batch, seqlen, fill):
    n = batch * seqlen
    D = packed.shape[1]
    out = torch.full((n + 1, D), fill, dtype=packed.dtype, device=packed.device)  # row n: dump for bad indices
    safe = torch.where((indices >= 0) & (indices < n), indices, torch.full_like(indices, n))
    out.index_copy_(0, safe, packed)
    return out[:n].view(batch, seqlen, D)


# ----------------------------------------------------------------------------------------------
# Custom ops


def _check_total(x: torch.Tensor, cu_seqlens: torch.Tensor, total: Optional[int]) -> None:
    if total is None:
        return
    if x.device.type == "cpu" or _VALIDATE:
        actual = int(cu_seqlens[-1])  # free on the CPU; one sync on CUDA (validation mode only)
        if actual != total:
            raise ValueError(f"varlen_compact: total={total} but keep has {actual} kept positions")


@torch.library.custom_op("omnisift::varlen_compact_op", mutates_args=())
def _compact_op(
    x: torch.Tensor,
    keep: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    total: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    if _use_ext("varlen_compact", x):
        out = torch.ops.omnisift.varlen_compact(x, keep, position_ids, labels, total)
    else:
        out = _compact_fallback(x, keep, position_ids, labels, total)
    _check_total(x, out[2], total)
    return tuple(out)  # type: ignore[return-value]


@_compact_op.register_fake
def _compact_fake(x, keep, position_ids=None, labels=None, total=None):
    B, L, D = x.shape
    if total is None:
        ctx = torch.library.get_ctx()
        T = ctx.new_dynamic_size()
        max_len = ctx.new_dynamic_size()
    else:
        T, max_len = total, -1
    packed = x.new_empty((T, D))
    indices = x.new_empty((T,), dtype=torch.int64)
    cu = x.new_empty((B + 1,), dtype=torch.int32)
    if position_ids is not None:
        shape = (T,) if position_ids.dim() == 2 else (position_ids.shape[0], T)
        pos = position_ids.new_empty(shape)
    else:
        pos = x.new_empty((0,), dtype=torch.int64)
    lab = labels.new_empty((T,)) if labels is not None else x.new_empty((0,), dtype=torch.int64)
    return packed, indices, cu, max_len, pos, lab


def _compact_setup(ctx, inputs, output):
    x = inputs[0]
    ctx.batch, ctx.seqlen = x.shape[0], x.shape[1]
    ctx.save_for_backward(output[1])


def _compact_backward(ctx, grad_packed, *unused):
    (indices,) = ctx.saved_tensors
    grad_x = None
    if grad_packed is not None and ctx.needs_input_grad[0]:
        grad_x = _scatter_op(grad_packed, indices, ctx.batch, ctx.seqlen, 0.0)
    return grad_x, None, None, None, None


_compact_op.register_autograd(_compact_backward, setup_context=_compact_setup)


@torch.library.custom_op("omnisift::varlen_scatter_op", mutates_args=())
def _scatter_op(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int, fill: float) -> torch.Tensor:
    if _use_ext("varlen_scatter", packed):
        return torch.ops.omnisift.varlen_scatter(packed, indices, batch, seqlen, fill)
    return _scatter_fallback(packed, indices, batch, seqlen, fill)


@_scatter_op.register_fake
def _scatter_fake(packed, indices, batch, seqlen, fill=0.0):
    return packed.new_empty((batch, seqlen, packed.shape[1]))


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad_out):
    (indices,) = ctx.saved_tensors
    grad_packed = None
    if ctx.needs_input_grad[0]:
        grad_packed = _gather_op(grad_out.reshape(-1, grad_out.shape[-1]), indices)
    return grad_packed, None, None, None, None


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


@torch.library.custom_op("omnisift::varlen_gather_op", mutates_args=())
def _gather_op(src: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if _use_ext("varlen_gather", src):
        return torch.ops.omnisift.varlen_gather(src, indices)
    return _gather_fallback(src, indices, True)


@_gather_op.register_fake
def _gather_fake(src, indices):
    return src.new_empty((indices.shape[0], src.shape[1]))


def _gather_setup(ctx, inputs, output):
    ctx.n_rows = inputs[0].shape[0]
    ctx.save_for_backward(inputs[1])


def _gather_backward(ctx, grad_out):
    (indices,) = ctx.saved_tensors
    grad_src = None
    if ctx.needs_input_grad[0]:
        grad_src = _scatter_op(grad_out, indices, 1, ctx.n_rows, 0.0).reshape(ctx.n_rows, grad_out.shape[-1])
    return grad_src, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def _register_cpp_fakes() -> None:
    """Fake kernels of the C++ ops too, so that they pass opcheck and trace like the Python ones."""
    if not _ext.EXT_AVAILABLE or not hasattr(torch.ops.omnisift, "varlen_compact"):
        return
    torch.library.register_fake("omnisift::varlen_compact")(_compact_fake)
    torch.library.register_fake("omnisift::varlen_scatter")(_scatter_fake)
    torch.library.register_fake("omnisift::varlen_gather")(_gather_fake)


_register_cpp_fakes()


# ----------------------------------------------------------------------------------------------
# Public functions


def varlen_compact(
    x: torch.Tensor,
    keep: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    total: Optional[int] = None,
) -> PackedBatch:
    """Packs the kept tokens of a padded batch (flash-attn ``unpad_input`` convention and order).

    Equivalent to ``x.flatten(0, 1)[keep.flatten()]`` with ``indices = keep.flatten().nonzero()``,
    ``cu_seqlens = [0, cumsum(keep.sum(1))]`` (int32) and ``max_seqlen = keep.sum(1).max()``.

    Args:
        x: ``[B, L, D]``, any dtype, any strides (rows are copied as bytes).
        keep: ``[B, L]`` bool, True = keep the token.
        position_ids: optional ``[3, B, L]`` (also ``[K, B, L]`` or ``[B, L]``), any dtype: gathered to
            ``[3, T]`` (``[K, T]`` / ``[T]``).
        labels: optional ``[B, L]``, any dtype: gathered to ``[T]``.
        total: optional host-known number of kept tokens ``T``. Given, the op never syncs with the host
            (and ``max_seqlen`` is returned as a 0-dim device tensor). Checked on the CPU always, on
            CUDA only in validation mode (see the module docstring).

    Returns:
        :class:`PackedBatch` ``(packed, indices, cu_seqlens, max_seqlen, position_ids, labels)``.
        Differentiable w.r.t. ``x`` (the gradient of dropped tokens is zero).

    Raises:
        TypeError: a non-tensor argument, ``keep`` not bool, ``total`` not an int.
        ValueError: mismatched shapes or devices, ``total`` out of range (or wrong, see above).
    """
    op = "varlen_compact"
    check_compact_inputs(op, x, keep, position_ids, labels, total)
    packed, indices, cu, max_len, pos, lab = _compact_op(x, keep, position_ids, labels, total)
    if total is not None:
        max_len = (cu[1:] - cu[:-1]).max() if x.shape[0] > 0 else cu.new_zeros(())
    return PackedBatch(
        packed, indices, cu, max_len, pos if position_ids is not None else None, lab if labels is not None else None
    )


def varlen_pad(
    x: torch.Tensor,
    keep: torch.Tensor,
    *,
    side: str = "right",
    position_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    pad_value: float = 0.0,
    position_pad: int = 0,
    label_pad: int = -100,
    total: Optional[int] = None,
    max_seqlen: Optional[int] = None,
) -> PaddedBatch:
    """Keeps the tokens of every row in order and pads the rows to the longest kept row.

    Row ``b`` of the output holds ``x[b, keep[b]]`` at positions ``[0, n_b)`` (``side="right"``) or
    ``[W - n_b, W)`` (``side="left"``), with ``W = max_b n_b``; the rest is padding.

    Args:
        x: ``[B, L, D]``, any dtype and strides.
        keep: ``[B, L]`` bool.
        side: ``"right"`` or ``"left"`` padding.
        position_ids: optional ``[3, B, L]`` (``[K, B, L]`` / ``[B, L]``), any dtype; padded with
            ``position_pad``.
        labels: optional ``[B, L]``, any dtype; padded with ``label_pad`` (default -100, ignored by the loss).
        pad_value: the value of padded rows of ``x``.
        position_pad: the position id of padded tokens.
        label_pad: the label of padded tokens.
        total: optional host-known number of kept tokens.
        max_seqlen: optional host-known longest kept row ``W`` (must be exact; checked like ``total``).
            With both ``total`` and ``max_seqlen`` the op never syncs; otherwise it reads both in one copy.

    Returns:
        :class:`PaddedBatch` ``(padded, attention_mask, position_ids, labels, indices, cu_seqlens,
        max_seqlen, pad_indices)``; ``attention_mask`` is int64 (1 = token, 0 = padding).
        Differentiable w.r.t. ``x``.

    Raises:
        TypeError / ValueError: like :func:`varlen_compact`; ``side`` not "right"/"left".
    """
    op = "varlen_pad"
    check_compact_inputs(op, x, keep, position_ids, labels, total)
    if side not in ("right", "left"):
        raise ValueError(f"{op}: side must be 'right' or 'left', got {side!r}")
    if max_seqlen is not None:
        check_size(op, "max_seqlen", max_seqlen)
    B, L, D = x.shape
    sync_free = total is not None and max_seqlen is not None
    res = varlen_compact(x, keep, position_ids=position_ids, labels=labels, total=total if sync_free else None)
    if sync_free:
        W = max_seqlen
        if x.device.type == "cpu" or _VALIDATE:
            actual = int(res.max_seqlen)
            if actual != W:
                raise ValueError(f"{op}: max_seqlen={W} but the longest kept row has {actual} tokens")
    else:
        W = res.max_seqlen
        if max_seqlen is not None and max_seqlen != W:
            raise ValueError(f"{op}: max_seqlen={max_seqlen} but the longest kept row has {W} tokens")
        if total is not None and total != res.packed.shape[0]:
            raise ValueError(f"{op}: total={total} but keep has {res.packed.shape[0]} kept positions")
    T = res.packed.shape[0]
    cu = res.cu_seqlens
    seqlens = (cu[1:] - cu[:-1]).long()
    dev = x.device
    row = torch.repeat_interleave(torch.arange(B, device=dev), seqlens, output_size=T)
    rank = torch.arange(T, device=dev) - cu.long()[row]
    offset = (W - seqlens)[row] if side == "left" else 0
    pad_indices = row * W + offset + rank

    padded = _scatter_op(res.packed, pad_indices, B, W, float(pad_value))
    cols = torch.arange(W, device=dev)
    if side == "right":
        attention_mask = (cols[None, :] < seqlens[:, None]).long()
    else:
        attention_mask = (cols[None, :] >= (W - seqlens)[:, None]).long()

    pos_out = None
    if position_ids is not None:
        p = res.position_ids
        p2 = p.unsqueeze(0) if p.dim() == 1 else p  # [K, T]
        K = p2.shape[0]
        out = torch.full((K, B * W), position_pad, dtype=p2.dtype, device=dev)
        out = out.index_copy(1, pad_indices, p2).view(K, B, W)
        pos_out = out.squeeze(0) if position_ids.dim() == 2 else out
    lab_out = None
    if labels is not None:
        lab_out = torch.full((B * W,), label_pad, dtype=labels.dtype, device=dev)
        lab_out = lab_out.index_copy(0, pad_indices, res.labels).view(B, W)
    return PaddedBatch(padded, attention_mask, pos_out, lab_out, res.indices, cu, W, pad_indices)


def varlen_scatter(
    packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int, fill: float = 0.0
) -> torch.Tensor:
    """Inverse of :func:`varlen_compact`: ``out.view(B*L, D)[indices] = packed``, other rows ``fill``.

    Args:
        packed: ``[T, D]``, any dtype and strides.
        indices: ``[T]`` int64 flat indices ``b * seqlen + l``, distinct (duplicates: undefined winner).
            Indices outside ``[0, batch*seqlen)`` are skipped (not validated: that would sync).
        batch: ``B``.
        seqlen: ``L``.
        fill: the value of rows no index points at.

    Returns:
        ``[B, L, D]`` tensor of ``packed.dtype``. Differentiable w.r.t. ``packed`` (backward: gather).

    Raises:
        TypeError: non-tensor inputs, ``indices`` not int64, ``batch``/``seqlen`` not ints.
        ValueError: wrong ranks, ``T`` mismatch, different devices, negative sizes.
    """
    op = "varlen_scatter"
    check_tensor(op, "packed", packed)
    check_tensor(op, "indices", indices)
    if packed.dim() != 2:
        raise ValueError(f"{op}: packed must be 2-D [T, D], got shape {tuple(packed.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be int64, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != packed.shape[0]:
        raise ValueError(f"{op}: indices must have shape [T] = [{packed.shape[0]}], got {list(indices.shape)}")
    check_same_device(op, "indices", indices, "packed", packed)
    check_size(op, "batch", batch)
    check_size(op, "seqlen", seqlen)
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise TypeError(f"{op}: fill must be a float, got {type(fill).__name__} {fill!r}")
    return _scatter_op(packed, indices, batch, seqlen, float(fill))


def varlen_gather(src: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``src[indices]`` along dim 0 (``[N, D]`` -> ``[T, D]``); indices outside ``[0, N)`` give zero rows.

    Args:
        src: ``[N, D]``, any dtype and strides.
        indices: ``[T]`` int64.

    Returns:
        ``[T, D]`` of ``src.dtype``. Differentiable w.r.t. ``src`` (backward: scatter).
    """
    op = "varlen_gather"
    check_tensor(op, "src", src)
    check_tensor(op, "indices", indices)
    if src.dim() != 2:
        raise ValueError(f"{op}: src must be 2-D [N, D], got shape {tuple(src.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{op}: indices must be 1-D [T], got shape {list(indices.shape)}")
    check_same_device(op, "indices", indices, "src", src)
    return _gather_op(src, indices)
