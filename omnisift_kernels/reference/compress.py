"""Reference OmniSIFT compression: readable PyTorch with loops over rows and chunks.

This is the oracle every fast path is tested against. The video similarities are computed in fp64
and rounded to fp32; the tie rule of spec §8 (stable sorts: among equal scores the earlier token is
ranked first) decides every cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..request import CompressRequest
from ..result import CompressionResult
from ..selector import VisionGuidedAudioSelector
from ..ste import straight_through_keep
from .plan import RowPlan, check_time_ids, plan_row

COSINE_EPS = 1e-8


def num_removed(n: int, rho: float) -> int:
    """``floor(n * rho)`` in double precision, as Python's ``int(n * rho)`` (spec §3)."""
    return int(n * rho)


def first_k_by_score(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (into ``scores``) of the ``k`` highest scores; ties go to the earlier index.

    Args:
        scores: fp32 ``[n]``.
        k: how many to take, ``0 <= k <= n``.

    Returns:
        int64 ``[k]`` positions, in ranking order.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def spatial_scores(frame: torch.Tensor) -> torch.Tensor:
    """cos(token, frame mean) for every token of ``frame [n, D]``, fp32 ``[n]``.

    Computed in fp64 and rounded to fp32 (spec §8 ranks fp32 scores) **[ours]**: the fp32 value of
    the exact cosine, which every backend reproduces (their kernels accumulate in fp64 too), so
    tokens whose scores differ by less than fp32 rounding still rank identically everywhere. (An
    fp32 evaluation is off by an ulp or more depending on the summation order.)
    """
    x = frame.double()
    return F.cosine_similarity(x, x.mean(dim=0, keepdim=True), dim=-1, eps=COSINE_EPS).float()


def temporal_scores(second: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """cos(second[i], first[i]) for two equal-sized frames ``[n, D]``, fp32 ``[n]`` (computed in
    fp64, see :func:`spatial_scores`)."""
    return F.cosine_similarity(second.double(), first.double(), dim=-1, eps=COSINE_EPS).float()


def prune_chunk_video(embeds: torch.Tensor, frames: list[torch.Tensor], rho_video: float) -> list[torch.Tensor]:
    """Spatio-temporal pruning of one chunk (spec §3).

    Args:
        embeds: ``[L, D]`` embeddings of the row.
        frames: one or two frames, int64 token positions each.
        rho_video: fraction of the first frame's tokens removed from each pruned frame.

    Returns:
        The positions dropped from the chunk (one tensor per frame).
    """
    first = frames[0]
    k = num_removed(len(first), rho_video)
    first_embeds = embeds[first]
    dropped = [first[first_k_by_score(spatial_scores(first_embeds), k)]]
    if len(frames) == 2:
        second = frames[1]
        if len(second) == len(first):
            sims = temporal_scores(embeds[second], first_embeds)  # against the unpruned first frame
            dropped.append(second[first_k_by_score(sims, k)])
        else:  # frames of different sizes: the second frame is not pruned
            dropped.append(second[:0])
    return dropped


def _right_pad(rows: list[torch.Tensor], width: int, fill) -> torch.Tensor:
    out = []
    for r in rows:
        pad = r.new_full((width - r.shape[0], *r.shape[1:]), fill)
        out.append(torch.cat([r, pad], dim=0))
    return torch.stack(out)


def _left_pad(rows: list[torch.Tensor], width: int, fill) -> torch.Tensor:
    out = []
    for r in rows:
        pad = r.new_full((width - r.shape[0], *r.shape[1:]), fill)
        out.append(torch.cat([pad, r], dim=0))
    return torch.stack(out)


def reference_compress(request: CompressRequest) -> CompressionResult:
    """OmniSIFT on a batch, one row and one chunk at a time.

    Args:
        request: the validated call (:class:`omnisift_kernels.request.CompressRequest`). Its
            ``grid``, if any (structure already checked), is compared with the sizes counted here,
            chunk by chunk: they must equal those the fast path derives from it
            (``omnisift_kernels.plan.sizes_from_grid``), else a ValueError. ``validate`` is the
            caller's business (:func:`omnisift_kernels.compress` checks before calling).

    Returns:
        A :class:`CompressionResult`.
    """
    inputs_embeds, input_ids, position_ids = request.inputs_embeds, request.input_ids, request.position_ids
    video_token_id, audio_token_id = request.video_token_id, request.audio_token_id
    rho_video, rho_audio, selector = request.rho_video, request.rho_audio, request.selector
    attention_mask, labels, output, grid = request.attention_mask, request.labels, request.output, request.grid
    B, L, D = inputs_embeds.shape
    device = inputs_embeds.device
    valid = torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    keep_mask = valid.clone()
    audio_scores = torch.zeros(B, L, dtype=torch.float32, device=device) if selector is not None else None
    scored = torch.zeros(B, L, dtype=torch.bool, device=device)
    plans: list[RowPlan] = []

    for b in range(B):
        check_time_ids("omnisift_kernels.compress", b, input_ids[b], position_ids[0, b], valid[b],
                       video_token_id, audio_token_id)
    for b in range(B):
        plan = plan_row(input_ids[b], position_ids[0, b], valid[b], video_token_id, audio_token_id)
        plans.append(plan)
        embeds = inputs_embeds[b]
        for chunk in plan.chunks:
            dropped = prune_chunk_video(embeds, chunk.frames, rho_video)
            for d in dropped:
                keep_mask[b, d] = False
            if selector is None or chunk.audio.numel() < 2:
                continue
            surviving = torch.cat([f[keep_mask[b, f]] for f in chunk.frames])
            if surviving.numel() == 0:
                continue
            scores = selector(embeds[chunk.audio], embeds[surviving])
            n_a = chunk.audio.numel()
            n_keep = n_a - num_removed(n_a, rho_audio)
            kept = chunk.audio[first_k_by_score(scores.detach().float(), n_keep)]
            keep_mask[b, chunk.audio] = False
            keep_mask[b, kept] = True
            audio_scores = audio_scores.index_put((torch.full_like(chunk.audio, b), chunk.audio), scores.float())
            scored[b, chunk.audio] = True

    if grid is not None:
        _check_grid_sizes(grid, plans, keep_mask, rho_video, rho_audio, selector is not None)

    # Gather the kept tokens of every row; kept scored audio rows go through the STE.
    rows_embeds, rows_pos, rows_labels, rows_index = [], [], [], []
    for b in range(B):
        pos = torch.nonzero(keep_mask[b]).flatten()
        row = inputs_embeds[b, pos]
        if audio_scores is not None:
            ste_rows = torch.nonzero(scored[b, pos]).flatten()
            if ste_rows.numel():
                through = straight_through_keep(row[ste_rows], audio_scores[b, pos[ste_rows]])
                row = row.index_copy(0, ste_rows, through)
        rows_embeds.append(row)
        rows_pos.append(position_ids[:, b, pos].transpose(0, 1))  # [n, 3]
        rows_labels.append(labels[b, pos] if labels is not None else None)
        rows_index.append(pos + b * L)

    lengths = torch.tensor([r.shape[0] for r in rows_embeds], dtype=torch.int64)
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    max_seqlen = int(lengths.max()) if B else 0
    max_pos = torch.tensor(
        [int(p.max()) if p.numel() else -1 for p in rows_pos], dtype=torch.int64
    )
    rope_deltas = max_pos.cpu() + 1 - lengths

    def counts(token_id: int, mask: torch.Tensor) -> torch.Tensor:
        return ((input_ids == token_id) & mask).sum(dim=1).to(torch.int64)

    common = dict(
        keep_mask=keep_mask,
        output=output,
        indices=torch.cat(rows_index).to(torch.int64) if B else torch.zeros(0, dtype=torch.int64, device=device),
        cu_seqlens=cu_seqlens.to(device),
        max_seqlen=max_seqlen,
        rope_deltas=rope_deltas.to(device),
        video_kept=counts(video_token_id, keep_mask),
        video_total=counts(video_token_id, valid),
        audio_kept=counts(audio_token_id, keep_mask),
        audio_total=counts(audio_token_id, valid),
        audio_scores=audio_scores,
    )
    if B == 0:  # an empty batch: torch.cat / torch.stack refuse empty lists
        n = (0,) if output == "packed" else (0, 0)
        return CompressionResult(
            inputs_embeds=inputs_embeds.new_zeros(*n, D),
            position_ids=position_ids.new_zeros(3, *n),
            attention_mask=None if output == "packed" else torch.zeros(0, 0, dtype=torch.int64, device=device),
            labels=None if labels is None else labels.new_zeros(n),
            **common,
        )
    if output == "packed":
        return CompressionResult(
            inputs_embeds=torch.cat(rows_embeds),
            position_ids=torch.cat(rows_pos).transpose(0, 1).contiguous(),
            attention_mask=None,
            labels=torch.cat(rows_labels) if labels is not None else None,
            **common,
        )
    pad = _right_pad if output == "right" else _left_pad
    ones = [torch.ones(r.shape[0], dtype=torch.int64, device=device) for r in rows_embeds]
    return CompressionResult(
        inputs_embeds=pad(rows_embeds, max_seqlen, 0.0),
        position_ids=pad(rows_pos, max_seqlen, 0).permute(2, 0, 1).contiguous(),
        attention_mask=pad(ones, max_seqlen, 0),
        labels=pad(rows_labels, max_seqlen, -100) if labels is not None else None,
        **common,
    )


def _check_grid_sizes(grid, plans: list[RowPlan], keep_mask: torch.Tensor, rho_video: float, rho_audio: float,
                      score_audio: bool) -> None:
    """Raises the fast path's error when the sizes of ``grid`` differ from the batch's, counted here."""
    from ..plan import PlanSizes, grid_mismatch_error, sizes_from_grid

    chunks = [(b, c) for b, p in enumerate(plans) for c in p.chunks]
    kept_video = [sum(int(keep_mask[b, f].sum()) for f in c.frames) for b, c in chunks]
    row_kept = keep_mask.sum(dim=1).tolist()
    counted = PlanSizes(
        num_video=sum(p.video.numel() for p in plans),
        num_audio=sum(p.audio.numel() for p in plans),
        num_frames=sum(len(p.frame_times) for p in plans),
        num_chunks=len(chunks),
        num_video_kept=sum(kept_video),
        num_audio_assigned=sum(c.audio.numel() for _, c in chunks),
        total_kept=sum(row_kept),
        max_seqlen=max(row_kept, default=0),
        max_chunk_audio=max((c.audio.numel() for _, c in chunks), default=0),
        max_chunk_video=max(kept_video, default=0),
    )
    from_grid, _ = sizes_from_grid(grid, rho_video=rho_video, rho_audio=rho_audio, score_audio=score_audio)
    if from_grid != counted:
        raise grid_mismatch_error("omnisift_kernels.compress", from_grid, counted)
