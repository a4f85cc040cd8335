"""Triton kernel for the segmented top-k mask (all segments in one launch).

Order: score descending, then position ascending. Every score becomes an int64 key whose
ascending order is exactly that order::

    key = desc32(score) * 2^31 + j          (j = position within the segment, < 2^31)

where ``desc32`` maps the fp32 bit pattern to a 32-bit integer decreasing with the score
(-0.0 is first turned into +0.0, so they tie as ``==`` says; NaN maps to 0, ranked first like
``torch.sort(descending=True)``). Element j is selected iff its rank (number of keys smaller than
its own) is < k: with distinct keys this is exactly the spec's rule.

Grid ``(S,)``: one program per segment, ``n = seg_offsets[s+1] - seg_offsets[s]``:

* ``k <= 0`` or ``k >= n``: the mask is constant, written without ranking.
* ``n <= SMALL`` (64; e.g. a 2-second audio chunk of 50 tokens): one ``[SMALL, SMALL]`` tile of
  pairwise key compares, ``rank_i = sum_j [key_j < key_i]`` (4096 compares).
* ``n <= MID`` (512; e.g. a video frame) or ``n <= BLOCK`` (``min(4096, next_pow2(N))``, a
  constexpr chosen from the host-known N): bitonic ``tl.sort`` of a MID/BLOCK-key register block
  (4096 keys: 78 compare-exchange stages, 16 keys per thread at 8 warps), then a scatter store
  ``out[start + pos(sorted[r])] = r < k``.
* larger: blocked pairwise ranking over ``[TILE_I, TILE_J]`` tiles: O(n^2) compares but any size
  works in the same launch (n = 8192 is 64M compares). This branch is compiled
  only when ``N > BLOCK`` (constexpr ``HAS_LARGE``): its ``[64, 128]`` int64 tile spilled at 4 warps
  in the kernels of smaller launches where it can never run (``bench/results/aot/``).

Bounds: the segment's ``[start, end)`` read from ``seg_offsets`` is clamped into ``[0, N]``, so no
load or store leaves ``scores`` / ``out`` whatever the offsets hold (the ops validate them).

Under the Triton interpreter (CPU) the defaults differ (see ``_default_blocks``): ``tl.sort`` is
very slow there, so every segment is ranked pairwise with big tiles; tests force every branch.

Traffic: reads each score once (twice-ish per tile row in the pairwise fallback, from L2),
writes each mask byte once. No atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, next_pow2

SMALL = 64
MID = 512
MAX_BLOCK = 4096
_KEY_PAD = 2**63 - 1


@triton.jit
def _order_key(s, j):
    """int64 key, ascending == (score descending, j ascending)."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0
    u = s.to(tl.int32, bitcast=True)
    u64 = u.to(tl.int64) & 0xFFFFFFFF
    asc = tl.where(u < 0, 0xFFFFFFFF - u64, u64 + 0x80000000)  # increases with the score
    desc = 0xFFFFFFFF - asc
    desc = tl.where(s != s, 0, desc)  # NaN first
    return desc * 2147483648 + j.to(tl.int64)


@triton.jit
def _sort_select(s_ptr, out_ptr, start, n, k, SIZE: tl.constexpr):
    """Rank by a bitonic sort of SIZE keys (n <= SIZE), scatter ``rank < k`` back."""
    j = tl.arange(0, SIZE)
    m = j < n
    s = tl.load(s_ptr + start + j, mask=m, other=0.0)
    key = tl.where(m, _order_key(s, j), 9223372036854775807)
    ks = tl.sort(key)
    pos = ks & 0x7FFFFFFF
    r = tl.arange(0, SIZE)
    tl.store(out_ptr + start + tl.where(r < n, pos, 0), r < k, mask=r < n)


@triton.jit
def _pairwise_select(s_ptr, out_ptr, start, n, k, TILE_I: tl.constexpr, TILE_J: tl.constexpr):
    """rank_i = #{j : key_j < key_i} over [TILE_I, TILE_J] tiles (one tile when n <= both)."""
    for i0 in range(0, n, TILE_I):
        i = i0 + tl.arange(0, TILE_I)
        mi = i < n
        ki = _order_key(tl.load(s_ptr + start + i, mask=mi, other=0.0), i)
        cnt = tl.zeros([TILE_I], dtype=tl.int64)
        for j0 in range(0, n, TILE_J):
            j = j0 + tl.arange(0, TILE_J)
            mj = j < n
            kj = _order_key(tl.load(s_ptr + start + j, mask=mj, other=0.0), j)
            kj = tl.where(mj, kj, 9223372036854775807)
            cnt += tl.sum((kj[None, :] < ki[:, None]).to(tl.int64), axis=1)
        tl.store(out_ptr + start + i, cnt < k, mask=mi)


@triton.jit
def _topk_mask_kernel(
    s_ptr, off_ptr, k_ptr, out_ptr, N,
    SMALL: tl.constexpr, MID: tl.constexpr, BLOCK: tl.constexpr,
    TILE_I: tl.constexpr, TILE_J: tl.constexpr, HAS_LARGE: tl.constexpr,
):
    seg = tl.program_id(0)
    # Clamped into [0, N]: whatever seg_offsets holds, no load or store leaves scores / out.
    start = tl.minimum(tl.maximum(tl.load(off_ptr + seg), 0), N)
    end = tl.minimum(tl.maximum(tl.load(off_ptr + seg + 1), start), N)
    n = end - start
    k = tl.load(k_ptr + seg)
    if (k <= 0) | (k >= n):
        for i0 in range(0, n, SMALL):
            i = i0 + tl.arange(0, SMALL)
            tl.store(out_ptr + start + i, (i >= 0) & (k > 0), mask=i < n)
    elif n <= SMALL:
        _pairwise_select(s_ptr, out_ptr, start, n, k, SMALL, SMALL)
    elif n <= MID:
        _sort_select(s_ptr, out_ptr, start, n, k, MID)
    elif n <= BLOCK:
        _sort_select(s_ptr, out_ptr, start, n, k, BLOCK)
    elif HAS_LARGE:  # compiled only when a segment can exceed BLOCK (N > BLOCK)
        _pairwise_select(s_ptr, out_ptr, start, n, k, TILE_I, TILE_J)


def _default_blocks(N: int, device: torch.device) -> dict:
    if device.type == "cpu" and interpreting():
        # The interpreter runs tl.sort as ~log2(n)^2 numpy ops on [2]*log2(n)-shaped arrays
        # (slow for thousands of keys), while a pairwise tile is a single numpy op: rank every
        # segment pairwise with big tiles. The sort branches are still tested by forcing them.
        return dict(small=min(256, max(16, next_pow2(N))), mid=16, block=16, tile_i=256,
                    tile_j=1024)
    block = min(MAX_BLOCK, max(16, next_pow2(N)))
    return dict(small=min(SMALL, block), mid=min(MID, block), block=block, tile_i=64, tile_j=128)


def segmented_topk_mask_triton(scores, seg_offsets, k, *, out=None, small=None, mid=None,
                               block=None, tile_i=None, tile_j=None):
    """Triton: per segment, True for the ``k[s]`` first elements in (score desc, position asc).

    Args:
        scores: ``float32 [N]``.
        seg_offsets: ``int64 [S+1]`` CSR offsets into ``scores``.
        k: ``int64 [S]`` number selected per segment (``<= 0``: none, ``>= n``: all).
        out: optional preallocated ``bool [N]`` (contiguous; every element is written).
        small, mid, block, tile_i, tile_j: tuning/testing knobs (powers of two >= 16): segments
            of ``n <= small`` are ranked in one pairwise tile, ``n <= mid`` / ``n <= block`` by a
            sort of that many keys, larger ones pairwise in ``[tile_i, tile_j]`` tiles. Defaults
            (GPU): 64 / 512 / ``min(4096, next_pow2(N))`` / 64 / 128.

    Returns:
        ``bool [N]``.
    """
    N = scores.numel()
    S = k.numel()
    if out is None:
        out = torch.empty(N, dtype=torch.bool, device=scores.device)
    elif out.shape != (N,) or out.dtype != torch.bool or not out.is_contiguous():
        raise ValueError(f"segmented_topk_mask: out must be a contiguous bool tensor of shape ({N},),"
                         f" got {out.dtype} {tuple(out.shape)}")
    if N == 0 or S == 0:
        return out
    cfg = _default_blocks(N, scores.device)
    for name, value in (("small", small), ("mid", mid), ("block", block), ("tile_i", tile_i),
                        ("tile_j", tile_j)):
        if value is not None:
            cfg[name] = value
    _topk_mask_kernel[(S,)](
        scores.contiguous(), seg_offsets.contiguous(), k.contiguous(), out, N,
        SMALL=cfg["small"], MID=cfg["mid"], BLOCK=cfg["block"],
        TILE_I=cfg["tile_i"], TILE_J=cfg["tile_j"], HAS_LARGE=N > cfg["block"],
        num_warps=8 if cfg["block"] >= 2048 else 4,
    )
    return out
