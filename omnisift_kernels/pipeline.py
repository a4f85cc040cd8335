"""The batched fast path: one call compresses a whole ragged batch with tensor ops and fused kernels.

Stages (each a function, testable alone; the benchmark times them one by one):

1. :func:`omnisift_kernels.plan.build_plan`: the frame/chunk plan (device, no sync).
2. sizes: :func:`~omnisift_kernels.plan.read_sizes` (the call's one device-to-host read) or
   :func:`~omnisift_kernels.plan.sizes_from_grid` (none).
3. :func:`index_plan`: CSR token lists of frames and chunks, pairs of the temporal comparison.
4. :func:`video_keep`: fused video scores + segmented selection (the ``k`` most redundant of each
   frame dropped); on the CPU with the extension :func:`video_keep_gather`, which also gathers the
   survivors' rows for stage 5 in the same pass.
5. :func:`audio_scores`: the selector on every chunk of every row at once (two projection matmuls
   over all audio and all surviving video, attention with a key padding mask).
6. :func:`audio_keep`: segmented selection of the ``n_keep`` best audio tokens of every chunk.
7. :func:`assemble`: the keep mask, the gather with the straight-through estimator, positions,
   labels, ``cu_seqlens`` and the padded layouts.

No Python loops over rows, frames or chunks; no ``.item()``/``.tolist()``/``nonzero``/boolean
indexing except the single sizes read of stage 2 when no ``grid`` is given (on CPU tensors, where a
read costs nothing, the layout and ``grid`` are also checked by reading the plan). The stages call the
registered ops (``torch.ops.omnisift.*``) directly: their index arguments come from the plan, so the
public functions' value checks are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from . import cpu_gemm, ops
from .ops.chunk_attention import chunk_attention
from ._ext import cpu_block_cache, ext_has_kernel
from ._validation import all_finite, check_finite, layout_error, layout_violations, non_finite_error
from .plan import DevicePlan, PlanSizes, build_plan, check_grid, grid_mismatch_error, read_sizes, sizes_from_grid
from .request import CompressRequest
from .result import CompressionResult
from .selector import VisionGuidedAudioSelector
from .triton_kernels import TRITON_AVAILABLE, triton_on_cpu

if TRITON_AVAILABLE:
    from .triton_kernels import assert_grid_matches


def compact_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the True entries of a 1-D bool ``mask``, ascending, given their ``count``.

    Like ``mask.nonzero().flatten()`` without the device-to-host read: the caller knows ``count``.

    Returns:
        int64 ``[count]``.
    """
    n = mask.shape[0]
    # A wrong count (a grid that does not describe the batch on CUDA, caught by a device-side
    # assertion) must not write out of bounds or leave garbage: extra entries land in the dump slot,
    # missing ones stay 0 (a valid index).
    slot = torch.where(mask, torch.cumsum(mask, 0) - 1, count).clamp_(max=count)
    out = torch.zeros(count + 1, dtype=torch.int64, device=mask.device)
    out.scatter_(0, slot, torch.arange(n, device=mask.device))
    return out[:count]


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive-prefix CSR offsets ``[len + 1]`` of int64 ``counts``."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


@dataclasses.dataclass
class IndexPlan:
    """Stage-3 token lists (exact sizes).

    Attributes:
        video_index: int64 ``[Nv]`` flat indices of video tokens (ascending).
        frame_offsets: int64 ``[F + 1]`` CSR offsets of frames into ``video_index``.
        frame_drop: int64 ``[F]`` tokens to drop per frame.
        pair_index: int64 ``[Nv]`` flat index of the same-index token of the chunk's first frame for
            tokens of a paired second frame, -1 elsewhere (spatial saliency).
        audio_index: int64 ``[Na]`` flat indices of audio tokens, grouped by chunk (in-window audio
            first, chunk by chunk, then audio outside every window).
        audio_chunk: int64 ``[Na]`` chunk of each entry of ``audio_index`` (``C`` for outside).
        audio_offsets: int64 ``[C + 2]`` CSR offsets (the last segment holds outside audio).
        audio_keep_count: int64 ``[C + 1]`` audio kept per segment.
    """

    video_index: torch.Tensor
    frame_offsets: torch.Tensor
    frame_drop: torch.Tensor
    pair_index: torch.Tensor
    audio_index: torch.Tensor
    audio_chunk: torch.Tensor
    audio_offsets: torch.Tensor
    audio_keep_count: torch.Tensor


def index_plan(plan: DevicePlan, sizes: PlanSizes) -> IndexPlan:
    """Stage 3: exact-size CSR lists from the stage-1 buffers (no sync).

    On CPU tensors (outside ``torch.compile`` tracing) the extension's ``omnisift::index_plan_cpu``
    builds them in two passes over the tokens; elsewhere
    :func:`_index_plan_torch`, the contract, whose lists it equals exactly.
    """
    if (plan.is_video.device.type == "cpu" and not torch.compiler.is_compiling()
            and ext_has_kernel("index_plan_cpu", "CPU")):
        return _index_plan_cpu(plan, sizes)
    return _index_plan_torch(plan, sizes)


def _index_plan_cpu(plan: DevicePlan, sizes: PlanSizes) -> IndexPlan:
    F = sizes.num_frames
    video_index, frame_offsets, pair_index, audio_index, audio_chunk, audio_offsets, keep_counts = (
        torch.ops.omnisift.index_plan_cpu(
            plan.is_video, plan.frame_len, plan.frame_id, plan.frame_is_paired, plan.is_audio, plan.audio_chunk,
            plan.chunk_audio, plan.chunk_audio_keep, F, sizes.num_chunks, sizes.num_video, sizes.num_audio,
            sizes.num_audio_assigned))
    return IndexPlan(
        video_index=video_index, frame_offsets=frame_offsets, frame_drop=plan.frame_drop[:F],
        pair_index=pair_index, audio_index=audio_index, audio_chunk=audio_chunk,
        audio_offsets=audio_offsets, audio_keep_count=keep_counts,
    )


def _index_plan_torch(plan: DevicePlan, sizes: PlanSizes) -> IndexPlan:
    """:func:`index_plan` in tensor ops (any device)."""
    F, C, Nv, Na = sizes.num_frames, sizes.num_chunks, sizes.num_video, sizes.num_audio
    video_index = compact_indices(plan.is_video, Nv)
    frame_offsets = _offsets(plan.frame_len[:F])
    frame_of = plan.frame_id[video_index]
    # Second frames of equal size compare token i with token i of the chunk's first frame.
    within = torch.arange(Nv, device=video_index.device) - frame_offsets[frame_of]
    partner = (frame_offsets[(frame_of - 1).clamp(min=0)] + within).clamp(max=max(Nv - 1, 0))
    pair_index = torch.where(plan.frame_is_paired[frame_of], video_index[partner], -1)

    audio_flat = compact_indices(plan.is_audio, Na)
    chunk = plan.audio_chunk[audio_flat].clamp(max=C)  # outside every window -> C
    order = torch.sort(chunk, stable=True).indices
    audio_index = audio_flat[order]
    audio_chunk = chunk[order]
    outside = Na - sizes.num_audio_assigned
    seg_counts = torch.cat([plan.chunk_audio[:C], plan.chunk_audio.new_full((1,), outside)])
    keep_counts = torch.cat([plan.chunk_audio_keep[:C], plan.chunk_audio.new_full((1,), outside)])
    return IndexPlan(
        video_index=video_index, frame_offsets=frame_offsets, frame_drop=plan.frame_drop[:F],
        pair_index=pair_index, audio_index=audio_index, audio_chunk=audio_chunk,
        audio_offsets=_offsets(seg_counts), audio_keep_count=keep_counts,
    )


def _split_finite_check(x: torch.Tensor, backend: str) -> bool:
    """Whether validation can be split: the C++ video kernel checks the video rows it reads anyway,
    :func:`all_finite` (skipping them) the others, so the embeddings are read once, not twice."""
    return (backend == "cpu" and x.device.type == "cpu" and x.dtype != torch.float64
            and not torch.compiler.is_compiling() and ops.video.cpu_kernel_serves(x))


def keep_gather_serves(x: torch.Tensor, backend: str) -> bool:
    """Whether :func:`video_keep_gather` (the fused C++ prune-and-gather kernel) serves this call: the
    CPU backend with the extension, no compile tracing, and no gradient wanted for ``x`` (the gathered
    rows are not differentiable; the selector's gradient into the video embeddings needs the torch
    gather)."""
    return (_split_finite_check(x, backend) and ext_has_kernel("video_keep_gather_cpu", "CPU")
            and not (torch.is_grad_enabled() and x.requires_grad))


def video_keep_gather(x: torch.Tensor, index: IndexPlan, rows_dtype: torch.dtype,
                      check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 4 plus the survivors' rows, in one C++ pass (see :func:`keep_gather_serves`).

    Returns:
        ``(keep [Nv] bool, rows [Nv_kept, D])``: :func:`video_keep`'s mask, and the rows of the kept
        video tokens in ``video_index`` order, gathered right after their chunk is scored (from
        cache), in fp32 when ``rows_dtype`` is fp32, else in ``x``'s dtype.
    """
    return torch.ops.omnisift.video_keep_gather_cpu(
        x, index.video_index, index.frame_offsets, index.pair_index, index.frame_drop,
        rows_fp32=rows_dtype == torch.float32, check_finite=check_finite)


def video_keep(x: torch.Tensor, index: IndexPlan, check_finite: bool = False) -> torch.Tensor:
    """Stage 4: bool ``[Nv]``, True for surviving video tokens (aligned with ``video_index``).

    ``check_finite`` (C++ CPU kernel only, see :func:`_split_finite_check`): raise a ValueError if a
    video row holds NaN or Inf.
    """
    if check_finite:
        scores = torch.ops.omnisift.video_scores_cpu(
            x, index.video_index, index.frame_offsets, index.pair_index, check_finite=True)
    else:
        scores = torch.ops.omnisift.video_scores(x, index.video_index, index.frame_offsets, index.pair_index)
    return ~torch.ops.omnisift.segmented_topk_mask(scores, index.frame_offsets, index.frame_drop)


def selector_rows_dtype(x: torch.Tensor, selector: VisionGuidedAudioSelector) -> torch.dtype:
    """The dtype in which the selector's fast path takes gathered rows of ``x``: the parameters'
    dtype, or fp32 when :func:`cpu_gemm.compute_dtype` widens half precision parameters and ``x`` is
    already in that dtype (widening it is then exact, and the GEMM reads the rows once)."""
    dtype = selector.param_dtype
    if x.dtype == dtype and cpu_gemm.compute_dtype(dtype, x.device) == torch.float32:
        return torch.float32
    return dtype


def audio_scores(
    x: torch.Tensor,
    selector: VisionGuidedAudioSelector,
    plan: DevicePlan,
    sizes: PlanSizes,
    index: IndexPlan,
    keep_video: torch.Tensor,
    video_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 5: the selector's fp32 score of every in-window audio token ``[Na_assigned]``.

    All chunks of all rows in one batched call: the two projections run as two matmuls over every
    surviving video token and every in-window audio token, then the projected tokens are laid into
    ``[C, max tokens, H]`` blocks and attend with a key padding mask.

    ``video_rows``: the surviving video rows ``[Nv_kept, D]`` in ``video_index`` order, when the
    caller already has them (the fused CPU kernel gathers them while pruning); else gathered here.
    """
    C, H = sizes.num_chunks, selector.hidden_dim
    dev = x.device
    dtype = selector.param_dtype
    linear = cpu_gemm.linear if dev.type == "cpu" else F.linear
    attention = chunk_attention if dev.type == "cpu" else None
    uniform_video = sizes.max_chunk_video >= 1 and sizes.num_video_kept == C * sizes.max_chunk_video
    if video_rows is None or not uniform_video:
        # Surviving video, grouped by chunk (video_index is ascending, so chunks are contiguous runs).
        survivors = compact_indices(keep_video, sizes.num_video_kept)
        video_flat = index.video_index[survivors]
        video_chunk = plan.frame_chunk[plan.frame_id[video_flat]]
        video_rank = torch.arange(video_flat.shape[0], device=dev) - _offsets(plan.chunk_video_kept[:C])[video_chunk]
    if video_rows is None:
        video_rows = ops.video.token_rows(x, video_flat)
    if video_rows.dtype != selector_rows_dtype(x, selector):
        video_rows = video_rows.to(dtype)
    v = selector.v_norm(linear(video_rows, selector.v_proj.weight, selector.v_proj.bias))
    n_assigned = sizes.num_audio_assigned
    audio_flat = index.audio_index[:n_assigned]
    audio_chunk = index.audio_chunk[:n_assigned]
    audio_rank = torch.arange(n_assigned, device=dev) - index.audio_offsets[audio_chunk]
    audio_rows = ops.video.token_rows(x, audio_flat).to(selector_rows_dtype(x, selector))
    a = selector.a_norm(linear(audio_rows, selector.a_proj.weight, selector.a_proj.bias))
    # Equal-sized chunks (known on the host: count == chunks x largest) are views of the projected
    # rows, which are grouped by chunk in chunk order; otherwise right-padded blocks and a key mask.
    if uniform_video:
        v_blocks, padding = v.view(C, sizes.max_chunk_video, H), None
    else:
        v_blocks = v.new_zeros(C, max(sizes.max_chunk_video, 1), H).index_put((video_chunk, video_rank), v)
        padding = torch.ones(C, v_blocks.shape[1], dtype=torch.bool, device=dev)
        padding = padding.index_put((video_chunk, video_rank), torch.zeros_like(video_chunk, dtype=torch.bool))
        # Chunks without surviving video cannot occur (every frame keeps >= 1 token); keep one key
        # open anyway so that no attention row is fully masked.
        padding[:, 0] = padding[:, 0] & (plan.chunk_video_kept[:C] > 0)
    uniform_audio = sizes.max_chunk_audio >= 1 and n_assigned == C * sizes.max_chunk_audio
    if uniform_audio:
        a_blocks = a.view(C, sizes.max_chunk_audio, H)
    else:
        a_blocks = a.new_zeros(C, max(sizes.max_chunk_audio, 1), H).index_put((audio_chunk, audio_rank), a)
    attended = selector.attend(a_blocks, v_blocks, padding, linear=linear, attention=attention)
    block_scores = selector.head_scores(attended, a_blocks, linear=linear)
    return block_scores.reshape(-1) if uniform_audio else block_scores[audio_chunk, audio_rank]


def audio_keep(index: IndexPlan, sizes: PlanSizes, scores: torch.Tensor | None) -> torch.Tensor:
    """Stage 6: bool ``[Na]``, True for kept audio tokens (aligned with ``index.audio_index``)."""
    if scores is None:
        return torch.ones(sizes.num_audio, dtype=torch.bool, device=index.audio_index.device)
    full = torch.cat([scores.detach().float(), scores.new_zeros(sizes.num_audio - scores.shape[0])])
    return torch.ops.omnisift.segmented_topk_mask(full, index.audio_offsets, index.audio_keep_count)


def assemble(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor | None,
    plan: DevicePlan,
    sizes: PlanSizes,
    index: IndexPlan,
    keep_video: torch.Tensor,
    keep_audio: torch.Tensor,
    scores: torch.Tensor | None,
    output: str,
    with_selector: bool,
) -> CompressionResult:
    """Stage 7: keep mask, gather with the STE, side tensors and the requested layout.

    ``with_selector``: a selector was given (``audio_scores`` is then a ``[B, L]`` map even when no
    chunk needed scoring).
    """
    B, L = plan.batch, plan.seqlen
    dev = x.device
    keep = plan.keep_base.clone()
    keep[index.video_index] = keep_video
    keep[index.audio_index] = keep_audio
    T = sizes.total_kept
    kept_index = compact_indices(keep, T)
    ste_scores = torch.zeros(B * L, dtype=torch.float32, device=dev)
    score_map = ste_scores.view(B, L) if with_selector else None
    if scores is not None:
        n = scores.shape[0]
        in_scored = plan.chunk_scored[index.audio_chunk[:n]]
        ste_scores = ste_scores.index_put((index.audio_index[:n],), torch.where(in_scored, scores.float(), 0.0))
        score_map = ste_scores.view(B, L)
    packed = torch.ops.omnisift.gather_ste(x, kept_index, ste_scores.view(B, L))
    pos = position_ids.reshape(3, B * L)[:, kept_index]
    lab = labels.reshape(B * L)[kept_index] if labels is not None else None
    lengths = plan.kept
    cu_seqlens = _offsets(lengths).to(torch.int32)
    row = kept_index // L
    max_pos = torch.full((B,), -1, dtype=torch.int64, device=dev)
    max_pos = max_pos.scatter_reduce(0, row, pos.amax(dim=0).to(torch.int64), reduce="amax")
    common = dict(
        keep_mask=keep.view(B, L), output=output, indices=kept_index, cu_seqlens=cu_seqlens,
        max_seqlen=sizes.max_seqlen, rope_deltas=max_pos + 1 - lengths,
        video_kept=plan.video_kept, video_total=plan.video_total,
        audio_kept=plan.audio_kept, audio_total=plan.audio_total, audio_scores=score_map,
    )
    if output == "packed":
        return CompressionResult(inputs_embeds=packed, position_ids=pos, attention_mask=None, labels=lab, **common)
    width = sizes.max_seqlen
    col = torch.arange(T, device=dev) - cu_seqlens[row].to(torch.int64)
    if output == "left":
        col = col + (width - lengths)[row]
    slot = (row, col)
    embeds = packed.new_zeros(B, width, x.shape[-1]).index_put(slot, packed)
    pos_pad = pos.new_zeros(3, B, width)
    pos_pad[:, row, col] = pos
    mask = torch.zeros(B, width, dtype=torch.int64, device=dev).index_put(slot, torch.ones_like(row))
    lab_pad = None
    if lab is not None:
        lab_pad = torch.full((B, width), -100, dtype=lab.dtype, device=dev).index_put(slot, lab)
    return CompressionResult(inputs_embeds=embeds, position_ids=pos_pad, attention_mask=mask, labels=lab_pad, **common)


def host_reads_are_free(device: torch.device) -> bool:
    """Whether the call may read its plan on the host for checks (CPU tensors: the values are already
    there). Elsewhere the checks ride on the one sizes read, or on a device-side assertion with
    ``grid``. (Tests patch this to run the device logic on CPU tensors under a sync guard.)"""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _assert_grid(op: str, plan: DevicePlan, violations: torch.Tensor, grid_sizes: PlanSizes) -> None:
    """A device-side assertion that ``grid`` describes the batch and the layout holds (no host read)."""
    msg = (f"{op}: grid does not describe input_ids/position_ids/attention_mask, or position_ids[0] breaks "
           "the layout (run the call eagerly on CPU tensors for details)")
    expected = list(dataclasses.astuple(grid_sizes))
    if plan.sizes.device.type == "cuda":
        assert_grid_matches(plan.sizes, violations, expected, msg)
    else:  # CPU tensors under torch.compile tracing, or the tests' device logic on the CPU
        ok = (plan.sizes == torch.tensor(expected, dtype=torch.int64)).all() & (violations == 0).all()
        torch._assert_async(ok, msg)


def fast_compress(request: CompressRequest, backend: str) -> CompressionResult:
    """The batched fast path behind :func:`omnisift_kernels.compress` (``request`` validated).

    ``backend`` is ``"cpu"`` (vectorized CPU kernels; CPU tensors) or ``"triton"`` (Triton kernels:
    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). With ``grid`` (per-row layout
    items of :mod:`omnisift_kernels.layout`) the call never reads the device; without it, one read
    fetches every size (and, with ``validate``, whether the embeddings are finite).
    """
    inputs_embeds, input_ids, position_ids = request.inputs_embeds, request.input_ids, request.position_ids
    video_token_id, audio_token_id = request.video_token_id, request.audio_token_id
    rho_video, rho_audio, selector = request.rho_video, request.rho_audio, request.selector
    attention_mask, labels, output, grid = request.attention_mask, request.labels, request.output, request.grid
    validate = request.validate
    if backend == "cpu" and inputs_embeds.device.type != "cpu":
        raise RuntimeError(
            f"omnisift_kernels.compress: backend='cpu' needs CPU tensors, got {inputs_embeds.device}; "
            "use backend='triton' or 'auto'"
        )
    op = "omnisift_kernels.compress"
    B, L, _ = inputs_embeds.shape
    on_cpu = host_reads_are_free(inputs_embeds.device)
    valid = (
        torch.ones(B, L, dtype=torch.bool, device=inputs_embeds.device)
        if attention_mask is None else attention_mask.bool()
    )
    grid_sizes = None
    if grid is not None:
        grid = check_grid(op, grid, B)
        grid_sizes, _ = sizes_from_grid(grid, rho_video=rho_video, rho_audio=rho_audio,
                                        score_audio=selector is not None)
    routing = triton_on_cpu() if backend == "triton" and inputs_embeds.device.type == "cpu" else contextlib.nullcontext()
    with routing, cpu_block_cache(backend == "cpu"):
        plan = build_plan(
            input_ids, position_ids[0], valid, video_token_id=video_token_id, audio_token_id=audio_token_id,
            rho_video=rho_video, rho_audio=rho_audio, score_audio=selector is not None,
        )
        violations = layout_violations(input_ids, position_ids[0], valid, video_token_id, audio_token_id)
        # Validation reads every element once: split between the video kernel (video rows) and
        # all_finite (the rest) when the C++ CPU kernel serves the call, all_finite alone otherwise.
        split = validate and _split_finite_check(inputs_embeds, backend)
        skip = plan.is_video.view(B, L) if split else None
        if on_cpu:
            # CPU tensors: reading the plan's sizes costs nothing, so the layout and the grid are
            # checked directly.
            if bool(violations.any()):
                raise layout_error(op, input_ids, position_ids[0], valid, video_token_id, audio_token_id,
                                   violations)
            if grid_sizes is not None:
                actual = PlanSizes(*plan.sizes.tolist())
                if actual != grid_sizes:
                    raise grid_mismatch_error(op, grid_sizes, actual)
        if grid_sizes is None:
            finite = all_finite(inputs_embeds, skip_rows=skip) if validate else None
            sizes = read_sizes(plan, finite, violations if not on_cpu else None)
            if sizes is None:
                raise layout_error(op, input_ids, position_ids[0], valid, video_token_id, audio_token_id,
                                   violations)
        else:
            if validate:
                check_finite(op, inputs_embeds, skip_rows=skip)
            if not on_cpu:
                # No host read: a mismatch fails a device-side assertion; until then every kernel
                # stays in bounds (index lists are clamped, gathers masked).
                _assert_grid(op, plan, violations, grid_sizes)
            sizes = grid_sizes
        index = index_plan(plan, sizes)
        score = selector is not None and sizes.num_audio_assigned and sizes.num_chunks
        video_rows = None
        try:
            if score and keep_gather_serves(inputs_embeds, backend):
                rows_dtype = selector_rows_dtype(inputs_embeds, selector)
                keep_v, video_rows = video_keep_gather(inputs_embeds, index, rows_dtype, check_finite=split)
            else:
                keep_v = video_keep(inputs_embeds, index, check_finite=split)
        except ValueError as e:
            if split and "NaN or Inf" in str(e):
                raise non_finite_error(op) from None
            raise
        scores = None
        if score:
            scores = audio_scores(inputs_embeds, selector, plan, sizes, index, keep_v, video_rows=video_rows)
        keep_a = audio_keep(index, sizes, scores)
        return assemble(
            inputs_embeds, position_ids, labels, plan, sizes, index, keep_v, keep_a, scores, output,
            with_selector=selector is not None,
        )
