"""Triton kernels for the video scores: frame saliency, temporal pair similarity, and both fused.

Addressing (all kernels): a token is a flat index ``t = b*L + l`` (int64); its row starts at
element ``b*stride_b + l*stride_l`` of ``x`` and its elements step by ``stride_d``. Row offsets are
int64 (they come from int64 token indices), feature offsets are cast to int64 before multiplying
by the stride, so ``T*D`` beyond 2^31 elements is fine. ``x`` is never made contiguous.

Cosine (``F.cosine_similarity`` in torch 2.13, eps = 1e-8)::

    cos(a, b) = <a, b> / (max(|a|, eps) * max(|b|, eps))      (fp64 accumulation, fp32 result)

so a zero vector scores exactly 0 and never NaN. Every sum is accumulated in fp64 and the cosine
rounded to fp32, as the reference and the CPU kernels do, so near ties rank alike on every backend.

Accumulation: constexpr ``COMPENSATED`` selects fp64 register tiles or compensated fp32 pairs
(``hi + lo``); the launchers' ``accumulation=`` argument and the rule that picks a mode per device
are in :mod:`.accumulation`.

Bounds: every index read from ``token_index`` / ``pair_index`` / the pairing map is checked against
``[0, B*L)`` and ``seg_offsets`` is clamped into ``[0, N]`` before use, so no load leaves ``x``
whatever the indices hold; an out-of-range token reads as a zero row (cosine 0). The ops raise on
such indices before launching; the masks make a bad launch memory-safe regardless.

Kernels
-------
``_segment_mean_kernel``  grid ``(S, cdiv(D, BLOCK_D))``. Program (s, j) sums the rows of segment s
    over the feature slice j in a ``[BLOCK_T, BLOCK_D]`` fp64 register tile (loop over the segment's
    tokens, runtime trip count), then writes ``mean[s, slice]`` (fp64, ``[S, D]``). Deterministic
    (no atomics: the summation order is fixed). Reads every row of the segment once.
    With ``HAS_PAIR`` (fused op) a segment none of whose tokens needs the mean (all have a
    temporal partner) is skipped after a scan of its ``pair_index`` (8 bytes per token).
``_cosine_kernel``  grid ``(cdiv(n_lanes, BLOCK_T),)``. Each program takes ``BLOCK_T`` lanes and
    loops over D in ``BLOCK_D`` slices (coalesced along D), accumulating dot products and squared
    norms in fp64 register tiles; one reduction at the end. Modes:

    * ``SALIENCY``: lane p = position in ``token_index``; other vector = its segment's mean
      (segment found by a binary search of ``seg_offsets``, ``ceil(log2 S)+1`` cached loads).
    * ``PAIR``: lane i = pair i; ``cos(x[second[i]], x[first[i]])``.
    * ``FUSED``: lane p = position. A saliency token (``pair_index < 0``) computes its
      cosine to the mean AND, when a second-frame token q "claims" it (``pair_index[q]`` is p's
      token), ``cos(x_q, x_p)`` from the same load of ``x_p``, written to ``out[q]``. A claimed
      token q does nothing itself; an unclaimed temporal token (its partner is not a saliency token
      of ``token_index``, or another token claimed the partner first) computes its own cosine to
      ``x[pair_index]``.

HBM traffic (elements of size e, D features, a chunk of two n-token frames):

    saliency op (all frames): 2 reads of every frame row + S*D*4 mean writes
    saliency (frame 1) + pair op (frame 2 vs 1):  frame 1 read 3x, frame 2 1x
    fused ``video_scores``:                       frame 1 read 2x, frame 2 1x
                                                  (mean pass skips frame 2; one joint pass)

plus the small int64 index traffic (``N*8`` bytes per index array) and, for the fused op, the
``B*L*8``-byte position map built by the launcher (vectorized torch, no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .accumulation import compensated_mode, launch_options
from .dispatch import interpreting, next_pow2

EPS = 1e-8

MODE_SALIENCY = 0
MODE_PAIR = 1
MODE_FUSED = 2


@triton.jit
def _row_offset(t, L, sxb, sxl):
    """Element offset (int64) of the row of flat token ``t = b*L + l``."""
    t = t.to(tl.int64)
    b = t // L
    return b * sxb + (t - b * L) * sxl


@triton.jit
def _find_segment(off_ptr, p, S, N_ITERS: tl.constexpr):
    """Largest s in [0, S-1] with seg_offsets[s] <= p: the (non-empty) segment holding position p."""
    lo = tl.zeros_like(p)
    hi = tl.zeros_like(p) + (S - 1)
    for _ in tl.static_range(N_ITERS):
        mid = (lo + hi + 1) // 2
        go = tl.load(off_ptr + mid) <= p
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e == a + b`` exactly (Knuth's TwoSum, fp32)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _acc_prod(hi, lo, a, b):
    """Compensated ``(hi, lo) += a * b`` in fp32: the product's rounding error (an fma) and the
    sum's (TwoSum) are collected in ``lo`` (Ogita-Rump-Oishi Dot2)."""
    p = a * b
    e = tl.fma(a, b, -p)
    s, err = _two_sum(hi, p)
    return s, lo + (err + e)


@triton.jit
def _in_rows(t, n_rows):
    """Whether flat token ``t`` addresses a row of ``x`` (``0 <= t < B*L``)."""
    return (t >= 0) & (t < n_rows)


@triton.jit
def _segment_mean_kernel(
    x_ptr, tok_ptr, off_ptr, pair_ptr, mean_ptr,
    n_tok, n_rows, L, D, sxb, sxl, sxd,
    HAS_PAIR: tl.constexpr, COMPENSATED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0)
    pid_d = tl.program_id(1)
    # Clamped into [0, n_tok]: whatever seg_offsets holds, every index load stays in bounds.
    start = tl.minimum(tl.maximum(tl.load(off_ptr + s), 0), n_tok)
    end = tl.minimum(tl.maximum(tl.load(off_ptr + s + 1), start), n_tok)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    d_off = d.to(tl.int64) * sxd
    lanes = tl.arange(0, BLOCK_T)
    stop = end
    if HAS_PAIR:
        # Only segments holding at least one saliency token (pair_index < 0) need their mean.
        need = tl.zeros([BLOCK_T], dtype=tl.int32)
        for i0 in range(start, end, BLOCK_T):
            i = i0 + lanes
            pr = tl.load(pair_ptr + i, mask=i < end, other=0)
            need += (pr < 0).to(tl.int32)
        stop = tl.where(tl.sum(need, axis=0) > 0, end, start)
    if COMPENSATED:
        hi = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        lo = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
    for i0 in range(start, stop, BLOCK_T):
        i = i0 + lanes
        i_mask = i < stop
        t = tl.load(tok_ptr + i, mask=i_mask, other=0)
        row = _row_offset(t, L, sxb, sxl)
        ok = i_mask & _in_rows(t, n_rows)
        v = tl.load(x_ptr + row[:, None] + d_off[None, :],
                    mask=ok[:, None] & d_mask[None, :], other=0.0)
        if COMPENSATED:
            hi, err = _two_sum(hi, v.to(tl.float32))
            lo += err
        else:
            acc += v.to(tl.float64)
    if COMPENSATED:
        total = tl.sum(hi.to(tl.float64) + lo.to(tl.float64), axis=0)
    else:
        total = tl.sum(acc, axis=0)
    count = tl.maximum((end - start).to(tl.float64), 1.0)
    mean = total / count
    if COMPENSATED:
        # [S, 2, D] fp32: the mean as hi + lo (exact to ~2^-48 relative), read by _cosine_kernel.
        m_hi = mean.to(tl.float32)
        m_lo = (mean - m_hi.to(tl.float64)).to(tl.float32)
        base = s.to(tl.int64) * 2 * D + d
        tl.store(mean_ptr + base, m_hi, mask=d_mask)
        tl.store(mean_ptr + base + D, m_lo, mask=d_mask)
    else:
        tl.store(mean_ptr + s.to(tl.int64) * D + d, mean, mask=d_mask)


@triton.jit
def _cos_from_sums(dot, na2, nb2, EPS: tl.constexpr):
    return dot / (tl.maximum(tl.sqrt(na2), EPS) * tl.maximum(tl.sqrt(nb2), EPS))


@triton.jit
def _cosine_kernel(
    x_ptr, a_ptr, b_ptr, off_ptr, mean_ptr, rev_ptr, claimed_ptr, out_ptr,
    n_lanes, n_rows, S, L, D, sxb, sxl, sxd,
    MODE: tl.constexpr, COMPENSATED: tl.constexpr, N_ITERS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EPS: tl.constexpr,
):
    # a_ptr: the lane's own token (token_index, or second_index for PAIR);
    # b_ptr: pair_index (FUSED) or first_index (PAIR); unused for SALIENCY.
    # A token outside [0, n_rows) is read as a zero row (its cosine is 0): no load leaves x.
    p = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    p_mask = p < n_lanes
    ta = tl.load(a_ptr + p, mask=p_mask, other=0)
    row_a = _row_offset(ta, L, sxb, sxl)
    if MODE == 0:  # SALIENCY
        seg = _find_segment(off_ptr, p, S, N_ITERS)
        use_a = p_mask
        use_mean = p_mask & (seg < S)
    elif MODE == 1:  # PAIR
        seg = p
        tb = tl.load(b_ptr + p, mask=p_mask, other=0)
        row_b = _row_offset(tb, L, sxb, sxl)
        use_a = p_mask
        use_b = p_mask & _in_rows(tb, n_rows)
    else:  # FUSED
        seg = _find_segment(off_ptr, p, S, N_ITERS)
        pr = tl.load(b_ptr + p, mask=p_mask, other=0)
        claimed = tl.load(claimed_ptr + p, mask=p_mask, other=0) != 0
        q = tl.load(rev_ptr + p, mask=p_mask, other=-1)
        sal = pr < 0
        use_a = p_mask & (~claimed)
        use_mean = use_a & sal & (seg < S)
        use_b = use_a & (~sal) & _in_rows(pr, n_rows)
        use_c = p_mask & sal & (q >= 0) & (q < n_lanes)
        row_b = _row_offset(tl.where(use_b, pr, 0), L, sxb, sxl)
        tq = tl.load(a_ptr + tl.where(use_c, q, 0), mask=use_c, other=0)
        row_c = _row_offset(tq, L, sxb, sxl)
        load_c = use_c & _in_rows(tq, n_rows)
    load_a = use_a & _in_rows(ta, n_rows)
    if COMPENSATED:
        mean_row = seg.to(tl.int64) * 2 * D
    else:
        mean_row = seg.to(tl.int64) * D

    if COMPENSATED:
        # (hi, lo) fp32 pairs; combined in fp64 once per lane after the loop.
        dot_h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        dot_l = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        na_h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        na_l = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        nb_h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        nb_l = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if MODE == 2:
            dc_h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            dc_l = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            nc_h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            nc_l = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    else:
        dot = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
        na2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
        nb2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
        if MODE == 2:
            dotc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
            nc2 = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = (d < D)[None, :]
        d_off = d.to(tl.int64)[None, :] * sxd
        if COMPENSATED:
            va = tl.load(x_ptr + row_a[:, None] + d_off, mask=load_a[:, None] & d_mask,
                         other=0.0).to(tl.float32)
            if MODE == 1:
                vb = tl.load(x_ptr + row_b[:, None] + d_off, mask=use_b[:, None] & d_mask,
                             other=0.0).to(tl.float32)
                vb_lo = tl.zeros_like(vb)
            else:
                # the mean as hi + lo; in FUSED exactly one of mean / partner row is live per lane.
                vb = tl.load(mean_ptr + mean_row[:, None] + d[None, :],
                             mask=use_mean[:, None] & d_mask, other=0.0)
                vb_lo = tl.load(mean_ptr + mean_row[:, None] + D + d[None, :],
                                mask=use_mean[:, None] & d_mask, other=0.0)
                if MODE == 2:
                    vb += tl.load(x_ptr + row_b[:, None] + d_off, mask=use_b[:, None] & d_mask,
                                  other=0.0).to(tl.float32)
                    vc = tl.load(x_ptr + row_c[:, None] + d_off, mask=load_c[:, None] & d_mask,
                                 other=0.0).to(tl.float32)
                    dc_h, dc_l = _acc_prod(dc_h, dc_l, va, vc)
                    nc_h, nc_l = _acc_prod(nc_h, nc_l, vc, vc)
            dot_h, dot_l = _acc_prod(dot_h, dot_l, va, vb)
            dot_l += va * vb_lo
            na_h, na_l = _acc_prod(na_h, na_l, va, va)
            nb_h, nb_l = _acc_prod(nb_h, nb_l, vb, vb)
            nb_l += 2.0 * vb * vb_lo
        else:
            va = tl.load(x_ptr + row_a[:, None] + d_off, mask=load_a[:, None] & d_mask,
                         other=0.0).to(tl.float64)
            if MODE == 0:
                vb = tl.load(mean_ptr + mean_row[:, None] + d[None, :],
                             mask=use_mean[:, None] & d_mask, other=0.0)
            elif MODE == 1:
                vb = tl.load(x_ptr + row_b[:, None] + d_off, mask=use_b[:, None] & d_mask,
                             other=0.0).to(tl.float64)
            else:
                # exactly one of the two masked loads is live per lane; the other contributes 0.
                vb = tl.load(mean_ptr + mean_row[:, None] + d[None, :],
                             mask=use_mean[:, None] & d_mask, other=0.0)
                vb += tl.load(x_ptr + row_b[:, None] + d_off, mask=use_b[:, None] & d_mask,
                              other=0.0).to(tl.float64)
                vc = tl.load(x_ptr + row_c[:, None] + d_off, mask=load_c[:, None] & d_mask,
                             other=0.0).to(tl.float64)
                dotc += va * vc
                nc2 += vc * vc
            dot += va * vb
            na2 += va * va
            nb2 += vb * vb
    if COMPENSATED:
        dot_r = tl.sum(dot_h.to(tl.float64) + dot_l.to(tl.float64), axis=1)
        na2_r = tl.sum(na_h.to(tl.float64) + na_l.to(tl.float64), axis=1)
        nb2_r = tl.sum(nb_h.to(tl.float64) + nb_l.to(tl.float64), axis=1)
    else:
        dot_r = tl.sum(dot, axis=1)
        na2_r = tl.sum(na2, axis=1)
        nb2_r = tl.sum(nb2, axis=1)
    cos = _cos_from_sums(dot_r, na2_r, nb2_r, EPS)
    tl.store(out_ptr + p, cos.to(tl.float32), mask=use_a)
    if MODE == 2:
        if COMPENSATED:
            dc_r = tl.sum(dc_h.to(tl.float64) + dc_l.to(tl.float64), axis=1)
            nc2_r = tl.sum(nc_h.to(tl.float64) + nc_l.to(tl.float64), axis=1)
        else:
            dc_r = tl.sum(dotc, axis=1)
            nc2_r = tl.sum(nc2, axis=1)
        cos_c = _cos_from_sums(dc_r, nc2_r, na2_r, EPS)
        tl.store(out_ptr + tl.where(use_c, q, 0), cos_c.to(tl.float32), mask=use_c)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are validated by the public ops (omnisift_kernels.ops); the launchers only
# assume: x [B, L, D] float (any strides), index tensors int64 1-D on x's device.


def _cos_blocks(D: int, fused: bool, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` of ``_cosine_kernel``.

    GPU: ``BLOCK_D = min(128, next_pow2(D))`` and a tile of 512 elements (SALIENCY/PAIR, three
    accumulators) or 256 (FUSED, five), i.e. ``[4, 128]`` / ``[2, 128]`` at the model's D, x 4
    warps: 4 or 2 accumulator elements per thread, in fp64 or as compensated fp32 pairs alike. The
    registers, spills and occupancy of every configuration, for sm_80 and sm_90, are in
    ``bench/results/aot/`` (``python -m bench.aot``). Fewer features: more rows per tile. The interpreter gets big tiles (fewer, vectorized programs).
    """
    block_d = min(256, next_pow2(D))
    if device.type == "cpu" and interpreting():
        return max(8, min(64, 2048 // block_d)), block_d, 4
    block_d = min(128, block_d)
    return max(1, min(64, (256 if fused else 512) // block_d)), block_d, 4


def _mean_blocks(S: int, D: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_D)`` of ``_segment_mean_kernel``: on the GPU a tile of 1024 elements,
    ``[8, 128]`` at the model's D (registers per configuration: ``bench/results/aot/``).
    Narrower feature slices when there are few segments."""
    block_d = min(256 if device.type == "cpu" else 128, next_pow2(D))
    # enough programs to fill an H100 (132 SMs) when there are few segments
    while block_d > 64 and S * triton.cdiv(D, block_d) < 264:
        block_d //= 2
    if device.type == "cpu" and interpreting():
        return max(8, min(64, 4096 // block_d)), block_d
    return max(8, min(64, 1024 // block_d)), block_d


def _check_out(out, n, name):
    if out is None:
        return None
    if out.shape != (n,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"{name}: out must be a contiguous float32 tensor of shape ({n},), got "
                         f"{out.dtype} {tuple(out.shape)}")
    return out


def _segment_means(x, tok, off, pair, compensated):
    B, L, D = x.shape
    S = off.numel() - 1
    # fp64 [S, D]; compensated: fp32 [S, 2, D] (the mean as hi + lo, see _segment_mean_kernel).
    mean = (torch.empty((S, 2, D), dtype=torch.float32, device=x.device) if compensated
            else torch.empty((S, D), dtype=torch.float64, device=x.device))
    if S <= 0:
        return mean
    block_t, block_d = _mean_blocks(S, D, x.device)
    grid = (S, triton.cdiv(D, block_d))
    _segment_mean_kernel[grid](
        x, tok, off, tok if pair is None else pair, mean,
        tok.numel(), B * L, L, D, x.stride(0), x.stride(1), x.stride(2),
        HAS_PAIR=pair is not None, COMPENSATED=compensated, BLOCK_T=block_t, BLOCK_D=block_d,
        **launch_options(compensated),
    )
    return mean


def frame_saliency_triton(x, token_index, seg_offsets, *, out=None, accumulation=None):
    """Triton: cosine of every token to its segment's mean. See ``ops.frame_saliency``.

    Args:
        x: ``[B, L, D]`` float embeddings, any strides.
        token_index: ``int64 [N]`` flat token indices (CSR values).
        seg_offsets: ``int64 [S+1]`` CSR offsets into ``token_index``.
        out: optional preallocated contiguous ``float32 [N]`` (every element is written).
        accumulation: ``"fp64"``, ``"compensated"`` or None (:func:`.accumulation.accumulation_mode` decides).

    Returns:
        ``float32 [N]``.
    """
    B, L, D = x.shape
    N = token_index.numel()
    S = seg_offsets.numel() - 1
    out = _check_out(out, N, "frame_saliency") if out is not None else torch.empty(
        N, dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    comp = compensated_mode("frame_saliency", x.device, accumulation)
    tok = token_index.contiguous()
    off = seg_offsets.contiguous()
    mean = _segment_means(x, tok, off, None, comp)
    block_t, block_d, warps = _cos_blocks(D, False, x.device)
    _cosine_kernel[(triton.cdiv(N, block_t),)](
        x, tok, tok, off, mean, tok, tok, out,
        N, B * L, S, L, D, x.stride(0), x.stride(1), x.stride(2),
        MODE=MODE_SALIENCY, COMPENSATED=comp, N_ITERS=max(1, S.bit_length()),
        BLOCK_T=block_t, BLOCK_D=block_d, EPS=EPS, num_warps=warps, **launch_options(comp),
    )
    return out


def frame_pair_similarity_triton(x, first_index, second_index, *, out=None, accumulation=None):
    """Triton: ``cos(x[second_index[i]], x[first_index[i]])`` for every pair, one launch.

    Args:
        x: ``[B, L, D]`` float embeddings, any strides.
        first_index: ``int64 [M]`` flat token indices.
        second_index: ``int64 [M]`` flat token indices.
        out: optional preallocated contiguous ``float32 [M]``.
        accumulation: ``"fp64"``, ``"compensated"`` or None (:func:`.accumulation.accumulation_mode` decides).

    Returns:
        ``float32 [M]``.
    """
    B, L, D = x.shape
    M = first_index.numel()
    out = _check_out(out, M, "frame_pair_similarity") if out is not None else torch.empty(
        M, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    comp = compensated_mode("frame_pair_similarity", x.device, accumulation)
    first = first_index.contiguous()
    second = second_index.contiguous()
    block_t, block_d, warps = _cos_blocks(D, False, x.device)
    _cosine_kernel[(triton.cdiv(M, block_t),)](
        x, second, first, first, out, first, first, out,
        M, B * L, 1, L, D, x.stride(0), x.stride(1), x.stride(2),
        MODE=MODE_PAIR, COMPENSATED=comp, N_ITERS=1,
        BLOCK_T=block_t, BLOCK_D=block_d, EPS=EPS, num_warps=warps, **launch_options(comp),
    )
    return out


def fused_pairing(token_index, pair_index, num_tokens: int):
    """Which position computes which temporal score in the fused kernel (vectorized, no sync).

    Returns ``(rev, claimed)``: ``rev[p]`` is the position q of the temporal token computed by the
    lane of saliency token p (``-1`` for none; the largest such q when several point at p), and
    ``claimed[q]`` says that q's score is written by its partner's lane. Assumes the flat indices
    in ``token_index`` are distinct (as CSR frames are). Indices outside ``[0, num_tokens)`` (in
    either array) pair with nothing; no index op here reads or writes out of bounds.
    """
    dev = token_index.device
    N = token_index.numel()
    ar = torch.arange(N, device=dev)
    # slot num_tokens: "no position" (stays -1); slot num_tokens + 1: where invalid tokens land.
    pos_of = torch.full((num_tokens + 2,), -1, dtype=torch.int64, device=dev)
    tok_ok = (token_index >= 0) & (token_index < num_tokens)
    pos_of.scatter_(0, torch.where(tok_ok, token_index, num_tokens + 1), ar)
    sal = pair_index < 0
    pair_ok = (~sal) & (pair_index < num_tokens)
    pp = pos_of.gather(0, torch.where(pair_ok, pair_index, num_tokens))
    ppc = pp.clamp_min(0)
    ok = (pp >= 0) & pair_ok & (pair_index.gather(0, ppc) < 0)
    rev = torch.full((N + 1,), -1, dtype=torch.int64, device=dev)
    rev.scatter_reduce_(0, torch.where(ok, pp, N), ar, reduce="amax")
    rev = rev[:N]
    claimed = ok & (rev.gather(0, ppc) == ar)
    return rev, claimed


def video_scores_triton(x, token_index, seg_offsets, pair_index, *, out=None, accumulation=None):
    """Triton: fused saliency (``pair_index < 0``) / temporal similarity (else). Two launches.

    Args:
        x: ``[B, L, D]`` float embeddings, any strides.
        token_index: ``int64 [N]`` flat token indices (CSR values, distinct).
        seg_offsets: ``int64 [S+1]`` CSR offsets.
        pair_index: ``int64 [N]``: ``-1`` for a saliency token, else the flat index of the token
            it is compared with.
        out: optional preallocated contiguous ``float32 [N]``.
        accumulation: ``"fp64"``, ``"compensated"`` or None (:func:`.accumulation.accumulation_mode` decides).

    Returns:
        ``float32 [N]``.
    """
    B, L, D = x.shape
    N = token_index.numel()
    S = seg_offsets.numel() - 1
    out = _check_out(out, N, "video_scores") if out is not None else torch.empty(
        N, dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    comp = compensated_mode("video_scores", x.device, accumulation)
    tok = token_index.contiguous()
    off = seg_offsets.contiguous()
    pair = pair_index.contiguous()
    rev, claimed = fused_pairing(tok, pair, B * L)
    mean = _segment_means(x, tok, off, pair, comp)
    block_t, block_d, warps = _cos_blocks(D, True, x.device)
    _cosine_kernel[(triton.cdiv(N, block_t),)](
        x, tok, pair, off, mean, rev, claimed.view(torch.uint8), out,
        N, B * L, S, L, D, x.stride(0), x.stride(1), x.stride(2),
        MODE=MODE_FUSED, COMPENSATED=comp, N_ITERS=max(1, S.bit_length()),
        BLOCK_T=block_t, BLOCK_D=block_d, EPS=EPS, num_warps=warps, **launch_options(comp),
    )
    return out
