"""The batched frame/chunk plan of the fast path, built with tensor ops (no loops over rows or chunks).

Stage 1 (:func:`build_plan`, on the device, no synchronisation) derives, for the whole flattened
batch, every per-frame and per-chunk quantity in buffers of the upper-bound size ``B*L`` (only the
first ``F`` frames / ``C`` chunks are meaningful), plus a small vector of sizes.

Stage 2 (:func:`read_sizes` or :func:`sizes_from_grid`) turns the sizes into host integers: one
device-to-host read, or none at all when the caller passes the host-side layout (``grid``).

Rules (spec §2, §3): a video token whose time id differs from the previous video token of its row
starts a frame (equal to "distinct time ids, ascending" because TMRoPE time ids never decrease along
a row's video tokens); chunk = frame // 2 within the row; each chunk's window runs from its first
frame's time id to the next chunk's, the row's last chunk to ``max(time id) + 1``, and audio tokens
are assigned to windows by ``searchsorted`` on (row, time id) keys. Every ``floor(n * rho)`` is taken
in float64 (spec §3).
"""

from __future__ import annotations

import dataclasses

import torch

from ._ext import ext_has_kernel
from .layout import SECONDS_PER_CHUNK, TOKENS_PER_SECOND, Audio, Image, Item, Text, Video, row_length

ROW_SHIFT = 40  # (row << 40) | time id: a sortable key while time ids stay below 2**40


@dataclasses.dataclass(frozen=True)
class PlanSizes:
    """Host-side sizes of one batch's plan.

    Attributes:
        num_video: video tokens ``Nv``.
        num_audio: audio tokens ``Na``.
        num_frames: frames ``F``.
        num_chunks: chunks ``C``.
        num_video_kept: video tokens that survive pruning.
        num_audio_assigned: audio tokens inside some chunk's window.
        total_kept: tokens kept over the batch ``T``.
        max_seqlen: the longest kept row.
        max_chunk_audio: most audio tokens in one chunk (selector query padding).
        max_chunk_video: most surviving video tokens in one chunk (selector key padding).
    """

    num_video: int
    num_audio: int
    num_frames: int
    num_chunks: int
    num_video_kept: int
    num_audio_assigned: int
    total_kept: int
    max_seqlen: int
    max_chunk_audio: int
    max_chunk_video: int


@dataclasses.dataclass
class DevicePlan:
    """Stage-1 plan: device tensors over the flattened batch (``BL = B*L``).

    Per token (``[BL]``): ``is_video``, ``is_audio``, ``keep_base`` (valid and neither video nor
    audio), ``frame_id`` (global frame of a video token), ``audio_chunk`` (global chunk of an audio
    token, ``BL`` when outside every window). Per frame (``[BL]``, first ``F`` meaningful):
    ``frame_len``, ``frame_drop`` (tokens removed), ``frame_chunk``, ``frame_is_paired`` (a second
    frame of the same size as its chunk's first). Per chunk (``[BL]``, first ``C`` meaningful):
    ``chunk_audio`` (audio tokens), ``chunk_video_kept``, ``chunk_audio_keep`` (audio kept), ``chunk_scored`` (the selector
    ranks the chunk's audio).
    Per row (``[B]``): ``video_total``, ``video_kept``, ``audio_total``, ``audio_kept``, ``kept``.
    ``sizes``: int64 ``[10]`` in :class:`PlanSizes` order.
    """

    batch: int
    seqlen: int
    is_video: torch.Tensor
    is_audio: torch.Tensor
    keep_base: torch.Tensor
    frame_id: torch.Tensor
    audio_chunk: torch.Tensor
    frame_len: torch.Tensor
    frame_drop: torch.Tensor
    frame_chunk: torch.Tensor
    frame_is_paired: torch.Tensor
    chunk_audio: torch.Tensor
    chunk_video_kept: torch.Tensor
    chunk_audio_keep: torch.Tensor
    chunk_scored: torch.Tensor
    video_total: torch.Tensor
    video_kept: torch.Tensor
    audio_total: torch.Tensor
    audio_kept: torch.Tensor
    kept: torch.Tensor
    sizes: torch.Tensor


def floor_times(n: torch.Tensor, rho: float) -> torch.Tensor:
    """``floor(n * rho)`` in float64, as Python's ``int(n * rho)`` (int64 result)."""
    return torch.floor(n.to(torch.float64) * rho).to(torch.int64)


def _scatter_into(size: int, index: torch.Tensor, src: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """``out[index] = src`` into a ``[size + 1]`` buffer whose last slot absorbs unwanted writes."""
    out = torch.full((size + 1,), fill, dtype=src.dtype, device=src.device)
    return out.scatter_(0, index, src)[:size]


def _count_into(size: int, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(size + 1, dtype=torch.int64, device=index.device)
    return out.scatter_add_(0, index, weight.to(torch.int64))[:size]


def _max_or_zero(t: torch.Tensor) -> torch.Tensor:
    """The largest entry of a non-negative int64 tensor, 0 when it is empty."""
    return torch.cat([t, t.new_zeros(1)]).max()


# The tensors of a DevicePlan in field order: the order omnisift::build_plan_cpu returns them in.
_PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(DevicePlan) if f.name not in ("batch", "seqlen"))


def build_plan(
    input_ids: torch.Tensor,
    time_ids: torch.Tensor,
    valid: torch.Tensor,
    *,
    video_token_id: int,
    audio_token_id: int,
    rho_video: float,
    rho_audio: float,
    score_audio: bool,
) -> DevicePlan:
    """Stage 1: the plan of a batch with tensor ops only (no host synchronisation).

    On CPU tensors (outside ``torch.compile`` tracing) the extension's ``omnisift::build_plan_cpu``
    computes the same tensors in a few sequential passes instead of the ~60 small tensor ops below,
    whose per-op overhead dominates on the CPU; elsewhere :func:`_build_plan_torch`.

    Args:
        input_ids: int ``[B, L]``.
        time_ids: int ``[B, L]``, row 0 of the TMRoPE ids.
        valid: bool ``[B, L]``, False at padding.
        video_token_id: id of video placeholders.
        audio_token_id: id of audio placeholders.
        rho_video: video removal ratio.
        rho_audio: audio removal ratio.
        score_audio: whether a selector runs (else all audio is kept).

    Returns:
        A :class:`DevicePlan`.
    """
    kw = dict(video_token_id=video_token_id, audio_token_id=audio_token_id, rho_video=rho_video,
              rho_audio=rho_audio, score_audio=score_audio)
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling() and ext_has_kernel("build_plan_cpu", "CPU"):
        return _build_plan_cpu(input_ids, time_ids, valid, **kw)
    return _build_plan_torch(input_ids, time_ids, valid, **kw)


def _build_plan_cpu(input_ids, time_ids, valid, *, video_token_id, audio_token_id, rho_video, rho_audio,
                    score_audio) -> DevicePlan:
    tensors = torch.ops.omnisift.build_plan_cpu(input_ids, time_ids, valid, int(video_token_id),
                                                int(audio_token_id), float(rho_video), float(rho_audio),
                                                bool(score_audio))
    B, L = input_ids.shape
    return DevicePlan(batch=B, seqlen=L, **dict(zip(_PLAN_FIELDS, tensors)))


def _build_plan_torch(input_ids, time_ids, valid, *, video_token_id, audio_token_id, rho_video, rho_audio,
                      score_audio) -> DevicePlan:
    """:func:`build_plan` with tensor ops on any device."""
    B, L = input_ids.shape
    BL = B * L
    dev = input_ids.device
    time_ids = time_ids.to(torch.int64)
    is_video2 = (input_ids == video_token_id) & valid
    is_audio2 = (input_ids == audio_token_id) & valid
    cols = torch.arange(L, device=dev).expand(B, L)
    # Index of the previous video token of the row (-1: none) and its time id.
    last_video = torch.cummax(torch.where(is_video2, cols, -1), dim=1).values
    prev_video = torch.cat([torch.full((B, 1), -1, dtype=torch.int64, device=dev), last_video], dim=1)[:, :L]
    prev_time = torch.gather(time_ids, 1, prev_video.clamp(min=0))
    frame_start2 = is_video2 & ((prev_video < 0) | (prev_time != time_ids))

    is_video = is_video2.flatten()
    is_audio = is_audio2.flatten()
    frame_start = frame_start2.flatten()
    times = time_ids.flatten()
    flat = torch.arange(BL, device=dev)
    row_of = flat // L
    dummy = torch.full_like(flat, BL)

    # Frames (global ids in row-major order; buffers of size BL, first F meaningful).
    frame_id = torch.cumsum(frame_start, 0) - 1
    num_frames = frame_start.sum()
    frame_len = _count_into(BL, torch.where(is_video, frame_id, dummy), torch.ones_like(flat))
    frame_first = _scatter_into(BL, torch.where(frame_start, frame_id, dummy), flat)
    frame_row = frame_first // L
    frame_time = times[frame_first]
    frame_ok = flat < num_frames
    frames_per_row = frame_start2.sum(dim=1)
    row_first_frame = torch.cumsum(frames_per_row, 0) - frames_per_row
    frame_in_row = torch.where(frame_ok, flat - row_first_frame[frame_row], 1)
    is_first = frame_ok & (frame_in_row % 2 == 0)
    is_second = frame_ok & (frame_in_row % 2 == 1)
    # Chunks.
    frame_chunk = torch.cumsum(is_first, 0) - 1
    num_chunks = is_first.sum()
    first_len = torch.where(is_second, torch.roll(frame_len, 1), frame_len)
    chunk_drop = floor_times(first_len, rho_video)
    frame_is_paired = is_second & (frame_len == first_len)
    frame_drop = torch.where(is_first | frame_is_paired, chunk_drop, 0)
    chunk_first = _scatter_into(BL, torch.where(is_first, frame_chunk, dummy), flat)
    chunk_ok = flat < num_chunks
    chunk_row = frame_row[chunk_first]
    big = torch.iinfo(torch.int64).max
    chunk_key = torch.where(chunk_ok, (chunk_row << ROW_SHIFT) | frame_time[chunk_first], big)
    chunk_video_kept = _count_into(BL, torch.where(frame_ok, frame_chunk, dummy), frame_len - frame_drop)

    # Audio -> chunk windows: the last chunk starting at or before the token's time id in its row.
    audio_key = (row_of << ROW_SHIFT) | times
    cand = torch.searchsorted(chunk_key, audio_key, right=True) - 1
    in_window = is_audio & (cand >= 0) & (chunk_row[cand.clamp(min=0)] == row_of)
    audio_chunk = torch.where(in_window, cand, dummy)
    chunk_audio = _count_into(BL, audio_chunk, torch.ones_like(flat))
    scored = chunk_ok & (chunk_audio >= 2) & (chunk_video_kept >= 1) & score_audio
    chunk_audio_keep = torch.where(scored, chunk_audio - floor_times(chunk_audio, rho_audio), chunk_audio)

    # Per-row counts.
    video_total = is_video2.sum(dim=1)
    audio_total = is_audio2.sum(dim=1)
    video_dropped = _count_into(B, torch.where(frame_ok, frame_row, B), frame_drop)[:B]
    audio_dropped = _count_into(B, torch.where(chunk_ok, chunk_row, B), chunk_audio - chunk_audio_keep)[:B]
    kept = valid.sum(dim=1) - video_dropped - audio_dropped
    sizes = torch.stack(
        [
            is_video.sum(),
            is_audio.sum(),
            num_frames,
            num_chunks,
            video_total.sum() - video_dropped.sum(),
            in_window.sum(),
            kept.sum(),
            _max_or_zero(kept),
            _max_or_zero(chunk_audio),
            _max_or_zero(chunk_video_kept),
        ]
    )
    return DevicePlan(
        batch=B, seqlen=L, is_video=is_video, is_audio=is_audio,
        keep_base=valid.flatten() & ~is_video & ~is_audio,
        frame_id=frame_id, audio_chunk=audio_chunk, frame_len=frame_len, frame_drop=frame_drop,
        frame_chunk=frame_chunk, frame_is_paired=frame_is_paired, chunk_audio=chunk_audio,
        chunk_video_kept=chunk_video_kept, chunk_audio_keep=chunk_audio_keep, chunk_scored=scored,
        video_total=video_total, video_kept=video_total - video_dropped,
        audio_total=audio_total, audio_kept=audio_total - audio_dropped, kept=kept, sizes=sizes,
    )


def read_sizes(plan: DevicePlan, finite: torch.Tensor | None = None,
               violations: torch.Tensor | None = None) -> PlanSizes | None:
    """Stage 2 without metadata: the one device-to-host read of the call.

    Args:
        plan: the stage-1 plan.
        finite: optional bool scalar (embeddings all finite) read in the same transfer; a ValueError
            is raised when it is False.
        violations: optional int64 ``[2]`` layout violation counts read in the same transfer.

    Returns:
        The sizes, or None when ``violations`` holds a violation (the caller raises its error).
    """
    parts = [plan.sizes]
    if violations is not None:
        parts.append(violations.to(torch.int64).reshape(-1).sum().view(1))
    if finite is not None:
        parts.append(finite.to(torch.int64).view(1))
    host = (torch.cat(parts) if len(parts) > 1 else plan.sizes).tolist()
    if finite is not None and not host.pop():
        from ._validation import non_finite_error

        raise non_finite_error("omnisift_kernels.compress")
    if violations is not None and host.pop():
        return None
    return PlanSizes(*host)


# ------------------------------------------------------------------------------------------------
# Host-side sizes from the layout (no device access at all).

@dataclasses.dataclass
class _HostRow:
    frames: list[tuple[int, int]]  # (time id, tokens)
    audio_runs: list[tuple[int, int]]  # (first time id, count) of consecutive time ids
    end: int  # max time id + 1
    length: int


def _host_row(items: list[Item]) -> _HostRow:
    """Lays a row out as ``omnisift_kernels.synthetic`` (and Qwen2.5-Omni) does, per item."""
    pos = 0  # next text position
    frames: list[tuple[int, int]] = []
    runs: list[tuple[int, int]] = []
    top = -1
    for it in items:
        if isinstance(it, Text):
            top = max(top, pos + it.tokens - 1) if it.tokens else top
            pos += it.tokens
            continue
        st = pos + 1  # bos token(s) at pos, media from pos + 1
        if isinstance(it, Video):
            offsets = it.frame_offsets()
            frames += [(st + t, it.tokens_per_frame) for t in offsets]
            if it.num_audio:
                runs.append((st, it.num_audio))
            media_top = max(
                st + offsets[-1] if it.seconds else st - 1,
                st + max(it.frame_h, it.frame_w) - 1 if it.seconds else st - 1,
                st + it.num_audio - 1,
            )
        elif isinstance(it, Audio):
            runs.append((st, it.tokens))
            media_top = st + it.tokens - 1
        elif isinstance(it, Image):
            media_top = max(st, st + max(it.h, it.w) - 1) if it.h * it.w else st - 1
        else:
            raise TypeError(f"sizes_from_grid: unknown layout item {it!r}")
        eos = max(media_top, pos) + 1
        top = max(top, eos)
        pos = eos + 1
    return _HostRow(frames=frames, audio_runs=runs, end=top + 1, length=row_length(items))


def check_grid(op: str, grid, batch: int) -> list[list[Item]]:
    """The structure of a caller's ``grid``: a list of ``batch`` rows, each a list of layout items.

    Whether it describes the tensors is checked against the plan (see ``pipeline.fast_compress``).

    Raises:
        TypeError: ``grid``, a row or an item of the wrong type.
        ValueError: a row count other than ``batch``.
    """
    if not isinstance(grid, (list, tuple)):
        raise TypeError(f"{op}: grid must be a list of rows (lists of layout items), got {type(grid).__name__}")
    if len(grid) != batch:
        raise ValueError(f"{op}: grid must describe {batch} rows (the batch size), got {len(grid)}")
    for b, row in enumerate(grid):
        if not isinstance(row, (list, tuple)):
            raise TypeError(f"{op}: grid[{b}] must be a list of layout items, got {type(row).__name__}")
        for i, item in enumerate(row):
            if not isinstance(item, (Text, Video, Audio, Image)):
                raise TypeError(f"{op}: grid[{b}][{i}] must be a Text, Video, Audio or Image of "
                                f"omnisift_kernels.layout, got {type(item).__name__} {item!r}")
    return [list(row) for row in grid]


def grid_mismatch_error(op: str, from_grid: PlanSizes, from_tensors: PlanSizes) -> ValueError:
    """The error of a ``grid`` whose sizes differ from those of the tensors it should describe."""
    diffs = [f"{f.name} {getattr(from_grid, f.name)} (tensors: {getattr(from_tensors, f.name)})"
             for f in dataclasses.fields(PlanSizes) if getattr(from_grid, f.name) != getattr(from_tensors, f.name)]
    return ValueError(f"{op}: grid does not describe input_ids/position_ids/attention_mask: it gives "
                      + ", ".join(diffs))


def _row_chunks(row: _HostRow, rho_video: float, rho_audio: float, score_audio: bool):
    """Per chunk of a host row (spec §2-§4): ``(video tokens, video kept, audio tokens, audio kept, start,
    end)``, with ``[start, end)`` the chunk's time window."""
    for c in range(0, len(row.frames), SECONDS_PER_CHUNK):
        pair = row.frames[c : c + 2]
        n1 = pair[0][1]
        k = int(n1 * rho_video)
        drops = [k] + [k if n == n1 else 0 for _, n in pair[1:]]
        chunk_total = sum(n for _, n in pair)
        chunk_video = chunk_total - sum(drops)
        start = pair[0][0]
        end = row.frames[c + 2][0] if c + 2 < len(row.frames) else row.end
        n_a = sum(max(0, min(end, s + n) - max(start, s)) for s, n in row.audio_runs)
        keep_a = n_a - int(n_a * rho_audio) if (score_audio and n_a >= 2 and chunk_video >= 1) else n_a
        yield chunk_total, chunk_video, n_a, keep_a, start, end


@dataclasses.dataclass(frozen=True)
class ChunkKeep:
    """What OmniSIFT keeps of one chunk (spec §2-§4), from the layout alone.

    Attributes:
        frames: ``(first, stop)``: the chunk's frames, as indices into the row's frames.
        window: ``(start, end)``: the chunk's time window, in time ids relative to the row's first frame
            (so a video's sound-track token ``k`` lies in it when ``start <= k < end``).
        video_tokens: video tokens of the chunk.
        video_kept: of them, those that survive pruning (same count in every frame of equal size).
        audio_tokens: audio tokens in the window.
        audio_kept: of them, those the selector keeps (all when it does not run on the chunk).
    """

    frames: tuple[int, int]
    window: tuple[int, int]
    video_tokens: int
    video_kept: int
    audio_tokens: int
    audio_kept: int


def chunk_keep_counts(
    items: list[Item], *, rho_video: float, rho_audio: float, score_audio: bool = True
) -> list[ChunkKeep]:
    """Per chunk of one row, in order, what it keeps (:class:`ChunkKeep`).

    The same per-chunk rule :func:`sizes_from_grid` sums (its kept row length is the row's length minus
    what these counts drop), so a caller that lays out compressed placeholders from it (the vLLM
    processor) cannot drift from the sizes. Audio outside every chunk's window is not listed.

    Args:
        items: the row's layout items (:mod:`omnisift_kernels.layout`).
        rho_video, rho_audio: removal ratios.
        score_audio: whether a selector runs.
    """
    row = _host_row(list(items))
    origin = row.frames[0][0] if row.frames else 0
    return [ChunkKeep(frames=(c, min(c + SECONDS_PER_CHUNK, len(row.frames))), window=(start - origin, end - origin),
                      video_tokens=vt, video_kept=vk, audio_tokens=at, audio_kept=ak)
            for c, (vt, vk, at, ak, start, end) in zip(range(0, len(row.frames), SECONDS_PER_CHUNK),
                                                       _row_chunks(row, rho_video, rho_audio, score_audio))]


def sizes_from_grid(
    grid: list[list[Item]], *, rho_video: float, rho_audio: float, score_audio: bool
) -> tuple[PlanSizes, list[int]]:
    """Every size of the plan from the host-side layout, with the spec's formulas.

    Args:
        grid: per row, its media items (:mod:`omnisift_kernels.layout`) in sequence order.
        rho_video: video removal ratio.
        rho_audio: audio removal ratio.
        score_audio: whether a selector runs.

    Returns:
        The :class:`PlanSizes` and the kept length of every row.
    """
    nv = na = nf = nc = vkept = assigned = 0
    max_a = max_v = 0
    kept_rows = []
    for items in grid:
        row = _host_row(list(items))
        nv += sum(n for _, n in row.frames)
        na += sum(n for _, n in row.audio_runs)
        nf += len(row.frames)
        dropped = 0
        for chunk_total, chunk_video, n_a, keep_a, _, _ in _row_chunks(row, rho_video, rho_audio, score_audio):
            dropped += chunk_total - chunk_video + n_a - keep_a
            nc += 1
            vkept += chunk_video
            assigned += n_a
            max_a = max(max_a, n_a)
            max_v = max(max_v, chunk_video)
        kept_rows.append(row.length - dropped)
    sizes = PlanSizes(
        num_video=nv, num_audio=na, num_frames=nf, num_chunks=nc, num_video_kept=vkept,
        num_audio_assigned=assigned, total_kept=sum(kept_rows), max_seqlen=max(kept_rows, default=0),
        max_chunk_audio=max_a, max_chunk_video=max_v,
    )
    return sizes, kept_rows
