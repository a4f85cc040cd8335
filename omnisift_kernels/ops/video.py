"""Video scores of OmniSIFT's spatio-temporal pruning (spec §3, §8).

Public ops (registered as ``omnisift::<name>`` custom ops; work eagerly, under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``):

* :func:`frame_saliency`: cosine of every token to its segment's (frame's) mean.
* :func:`frame_pair_similarity`: cosine of token pairs (second frame vs first frame).
* :func:`video_scores`: both in one op, reading the first frame of a chunk twice instead of three
  times (see ``omnisift_kernels.triton_kernels.video`` for the traffic).

Data model: ``x`` is ``[B, L, D]`` (fp32/bf16/fp16/fp64, any strides); a token is addressed by its
flat index ``t = b*L + l`` (int64); segments are CSR (``token_index [N]``, ``seg_offsets [S+1]``,
empty segments allowed). Outputs are ``float32`` and aligned with the index arrays. No op
synchronizes with the host. The cosine is ``F.cosine_similarity`` of torch 2.13 with eps = 1e-8,
``<a, b> / (max(|a|, eps) * max(|b|, eps))``, accumulated in fp64 and rounded to fp32 (every backend
and the reference alike, so near ties rank the same everywhere): a zero vector scores 0, not NaN.

Index values are validated on every backend: indices in ``[0, B*L)`` (``pair_index`` may also be
negative, meaning "the segment mean"), ``seg_offsets`` starting at 0, non-decreasing and ending at N.
On CPU tensors a violation is a ValueError naming the op and argument; on CUDA tensors (no host read)
it fails a device-side assertion, and the kernels' loads are masked so nothing is read out of
bounds meanwhile. Repeated indices in ``token_index`` are allowed (a token counted twice in its
segment's mean, on every backend alike).

Path: on CUDA tensors the Triton kernels run; on CPU tensors the C++ kernel (or a vectorized torch
path without the extension), unless ``TRITON_INTERPRET=1`` is set and the call runs inside
``omnisift_kernels.triton_kernels.triton_on_cpu()`` (then the Triton kernels run through the
interpreter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._ext import ext_has_kernel
from .._validation import (
    check_embeddings,
    check_index,
    check_index_values,
    check_offsets,
    check_offsets_values,
)
from ..triton_kernels import TRITON_AVAILABLE, use_triton

if TRITON_AVAILABLE:
    from ..triton_kernels import (
        frame_pair_similarity_triton,
        frame_saliency_triton,
        video_scores_triton,
    )

__all__ = ["frame_pair_similarity", "frame_saliency", "video_scores"]

EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Vectorized torch path (any device; the CPU path). No loops over segments, no host syncs.


def token_rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x.flatten(0, 1)[t]`` without copying ``x`` (respects the strides).

    When the batch and sequence dimensions merge into one strided dimension (contiguous inputs and
    most views) this is an ``index_select`` on a ``[B*L, D]`` view, a plain row copy; otherwise
    advanced indexing with two index tensors (much slower on the CPU).
    """
    flat = flat_rows_view(x)
    if flat is not None:
        return flat.index_select(0, t)
    L = x.shape[1]
    return x[t // L, t % L]


def flat_rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x [B, L, D]`` as a ``[B*L, D]`` view when the batch and sequence dimensions merge into one
    strided dimension (contiguous inputs and most views), else None."""
    B, L, D = x.shape
    if B == 1 or x.stride(0) == L * x.stride(1):
        return x.as_strided((B * L, D), (x.stride(1), x.stride(2)))
    return None


def _cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``cos(a_i, b_i) = <a_i, b_i> / (max(|a_i|, eps) * max(|b_i|, eps))`` of fp64 ``[N, D]``,
    rounded to fp32 ``[N]``.

    The formula of ``F.cosine_similarity`` (each norm clamped by eps) in three reductions and no
    ``[N, D]`` temporaries (that function normalises both inputs first: two full-size divisions).
    Every backend computes the video cosines in fp64 and rounds them to fp32, as the reference does,
    so near ties rank alike everywhere.
    """
    dot = torch.einsum("nd,nd->n", a, b)
    na = torch.linalg.vector_norm(a, dim=-1).clamp_min(EPS)
    nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(EPS)
    return (dot / (na * nb)).float()


def segment_ids(seg_offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Segment of every CSR position ``0..n-1`` (the last segment s with ``seg_offsets[s] <= p``)."""
    pos = torch.arange(n, device=seg_offsets.device)
    return torch.searchsorted(seg_offsets, pos, right=True) - 1


def _segment_means_torch(rows, seg, seg_offsets):
    S = seg_offsets.shape[0] - 1
    sums = torch.zeros((S, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    # index_put_(accumulate) is serial (deterministic) on the CPU; index_add_ there can be
    # pathologically slow under thread contention.
    sums.index_put_((seg,), rows, accumulate=True)
    counts = (seg_offsets[1:] - seg_offsets[:-1]).clamp_min(1).to(rows.dtype)
    return sums / counts[:, None]


def frame_saliency_torch(x, token_index, seg_offsets):
    """Vectorized torch path of :func:`frame_saliency`."""
    N = token_index.shape[0]
    rows = token_rows(x, token_index).double()
    seg = segment_ids(seg_offsets, N)
    mean = _segment_means_torch(rows, seg, seg_offsets)
    return _cosine_rows(rows, mean.index_select(0, seg))


def frame_pair_similarity_torch(x, first_index, second_index):
    """Vectorized torch path of :func:`frame_pair_similarity`."""
    a = token_rows(x, second_index).double()
    b = token_rows(x, first_index).double()
    return _cosine_rows(a, b)


def video_scores_torch(x, token_index, seg_offsets, pair_index):
    """Vectorized torch path of :func:`video_scores`."""
    N = token_index.shape[0]
    rows = token_rows(x, token_index).double()
    seg = segment_ids(seg_offsets, N)
    mean = _segment_means_torch(rows, seg, seg_offsets)
    sal = pair_index < 0
    # One gather builds every token's other vector: its segment's mean (rows 0..S-1 of the table)
    # or its temporal partner (row S + k of the table for the k-th listed token, or x itself when
    # the partner is not a listed token).
    partner = token_rows(x, torch.where(sal, token_index, pair_index)).double()
    other = torch.where(sal[:, None], mean.index_select(0, seg), partner)
    return _cosine_rows(rows, other)


def cpu_kernel_serves(x: torch.Tensor) -> bool:
    """Whether the extension's C++ CPU kernel ``omnisift::video_scores_cpu`` serves ``x``."""
    return x.device.type == "cpu" and not FORCE_TORCH_PATH and ext_has_kernel("video_scores_cpu", "CPU")


# Tests set this to compare the C++ CPU kernel with the pure-torch path.
FORCE_TORCH_PATH = False


def video_scores_cpu(x, token_index, seg_offsets, pair_index):
    """CPU path of the three video ops: the C++ kernel (rows read in place, no ``[N, D]``
    temporaries) when the extension is built, else the vectorized torch path."""
    if cpu_kernel_serves(x):
        return torch.ops.omnisift.video_scores_cpu(x, token_index, seg_offsets, pair_index)
    return video_scores_torch(x, token_index, seg_offsets, pair_index)


# ----------------------------------------------------------------------------------------------
# Registered custom ops (what torch.compile sees). Dispatch on the device inside.


@torch.library.custom_op("omnisift::frame_saliency", mutates_args=())
def _frame_saliency_op(x: torch.Tensor, token_index: torch.Tensor,
                       seg_offsets: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return frame_saliency_triton(x, token_index, seg_offsets)
    if cpu_kernel_serves(x):
        return video_scores_cpu(x, token_index, seg_offsets, torch.full_like(token_index, -1))
    return frame_saliency_torch(x, token_index, seg_offsets)


@_frame_saliency_op.register_fake
def _(x, token_index, seg_offsets):
    return x.new_empty(token_index.shape, dtype=torch.float32)


@torch.library.custom_op("omnisift::frame_pair_similarity", mutates_args=())
def _frame_pair_similarity_op(x: torch.Tensor, first_index: torch.Tensor,
                              second_index: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return frame_pair_similarity_triton(x, first_index, second_index)
    if cpu_kernel_serves(x):
        offsets = torch.tensor([0, second_index.shape[0]], dtype=torch.int64)
        return video_scores_cpu(x, second_index, offsets, first_index)
    return frame_pair_similarity_torch(x, first_index, second_index)


@_frame_pair_similarity_op.register_fake
def _(x, first_index, second_index):
    return x.new_empty(first_index.shape, dtype=torch.float32)


@torch.library.custom_op("omnisift::video_scores", mutates_args=())
def _video_scores_op(x: torch.Tensor, token_index: torch.Tensor, seg_offsets: torch.Tensor,
                     pair_index: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return video_scores_triton(x, token_index, seg_offsets, pair_index)
    return video_scores_cpu(x, token_index, seg_offsets, pair_index)


@_video_scores_op.register_fake
def _(x, token_index, seg_offsets, pair_index):
    return x.new_empty(token_index.shape, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Public functions.


def frame_saliency(x: torch.Tensor, token_index: torch.Tensor,
                   seg_offsets: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token to the mean of its segment (spec §3, first frame).

    The mean is taken over the segment's tokens and the cosine is
    ``F.cosine_similarity(token, mean, dim=-1, eps=1e-8)``, both in fp64, rounded to fp32.

    Args:
        x: ``[B, L, D]`` float32/bfloat16/float16/float64 embeddings, any strides.
        token_index: ``int64 [N]`` flat token indices ``b*L + l``; segment s is
            ``token_index[seg_offsets[s]:seg_offsets[s+1]]``.
        seg_offsets: ``int64 [S+1]`` CSR offsets (``seg_offsets[0] = 0``, ``seg_offsets[S] = N``,
            non-decreasing; empty segments allowed).

    Returns:
        ``float32 [N]`` aligned with ``token_index``.

    Raises:
        TypeError, ValueError: on a wrong type, dtype, rank, length or device, or index values
            outside their range (see the module docstring).
    """
    op = "frame_saliency"
    check_embeddings(op, x)
    check_index(op, "token_index", token_index, x.device)
    check_offsets(op, seg_offsets, x.device)
    check_index_values(op, "token_index", token_index, x.shape[0] * x.shape[1])
    check_offsets_values(op, seg_offsets, token_index.shape[0])
    return torch.ops.omnisift.frame_saliency(x, token_index, seg_offsets)


def frame_pair_similarity(x: torch.Tensor, first_index: torch.Tensor,
                          second_index: torch.Tensor) -> torch.Tensor:
    """``cos(x[second_index[i]], x[first_index[i]])`` for every pair i (spec §3, second frame).

    All chunks of all rows are handled in one launch.

    Args:
        x: ``[B, L, D]`` float32/bfloat16/float16/float64 embeddings, any strides.
        first_index: ``int64 [M]`` flat token indices of the first-frame tokens.
        second_index: ``int64 [M]`` flat token indices of the second-frame tokens.

    Returns:
        ``float32 [M]``.

    Raises:
        TypeError, ValueError: on a wrong type, dtype, rank, length or device, or index values
            outside their range (see the module docstring).
    """
    op = "frame_pair_similarity"
    check_embeddings(op, x)
    check_index(op, "first_index", first_index, x.device)
    check_index(op, "second_index", second_index, x.device, first_index.shape[0],
                " (= len(first_index))")
    check_index_values(op, "first_index", first_index, x.shape[0] * x.shape[1])
    check_index_values(op, "second_index", second_index, x.shape[0] * x.shape[1])
    return torch.ops.omnisift.frame_pair_similarity(x, first_index, second_index)


def video_scores(x: torch.Tensor, token_index: torch.Tensor, seg_offsets: torch.Tensor,
                 pair_index: torch.Tensor) -> torch.Tensor:
    """Fused video scores: saliency for first-frame tokens, temporal similarity for the others.

    For position p: if ``pair_index[p] < 0`` (use -1), ``cos(x[token_index[p]], mean of its
    segment)``; otherwise ``cos(x[token_index[p]], x[pair_index[p]])``. Equal to
    :func:`frame_saliency` / :func:`frame_pair_similarity` on the respective tokens, but the
    Triton path skips the means of segments without saliency tokens and computes a first-frame
    token's two cosines from one read of it.

    Args:
        x: ``[B, L, D]`` float32/bfloat16/float16/float64 embeddings, any strides.
        token_index: ``int64 [N]`` distinct flat token indices (CSR values).
        seg_offsets: ``int64 [S+1]`` CSR offsets.
        pair_index: ``int64 [N]``: negative (use -1) for "the segment mean", or the flat index (in
            ``[0, B*L)``) of the token to compare with (for the second frame of a chunk: the token at
            the same index in the first frame).

    Returns:
        ``float32 [N]`` aligned with ``token_index``.

    Raises:
        TypeError, ValueError: on a wrong type, dtype, rank, length or device, or index values
            outside their range (see the module docstring).
    """
    op = "video_scores"
    check_embeddings(op, x)
    check_index(op, "token_index", token_index, x.device)
    check_offsets(op, seg_offsets, x.device)
    check_index(op, "pair_index", pair_index, x.device, token_index.shape[0],
                " (= len(token_index))")
    BL = x.shape[0] * x.shape[1]
    check_index_values(op, "token_index", token_index, BL)
    check_index_values(op, "pair_index", pair_index, BL, allow_negative=True)
    check_offsets_values(op, seg_offsets, token_index.shape[0])
    return torch.ops.omnisift.video_scores(x, token_index, seg_offsets, pair_index)
