"""The frame/chunk plan of one batch row (spec §2), written for reading, not speed."""

from __future__ import annotations

import dataclasses

import torch

from .._validation import TIME_ID_LIMIT, time_id_order_error, time_id_range_error


@dataclasses.dataclass
class ChunkPlan:
    """One 2-second chunk of a row.

    Attributes:
        frames: the chunk's frames (one or two), each an int64 tensor of token positions in
            ascending order.
        audio: int64 positions of the chunk's audio tokens (time id inside the window), ascending.
        window: the chunk's time window ``[start, end)``.
    """

    frames: list[torch.Tensor]
    audio: torch.Tensor
    window: tuple[int, int]


@dataclasses.dataclass
class RowPlan:
    """The layout of one row.

    Attributes:
        video: int64 positions of the row's (non-padding) video tokens.
        audio: int64 positions of the row's (non-padding) audio tokens.
        frame_times: the distinct time ids of the video tokens, ascending.
        chunks: the chunks of the row, in order.
    """

    video: torch.Tensor
    audio: torch.Tensor
    frame_times: list[int]
    chunks: list[ChunkPlan]


def plan_row(
    input_ids: torch.Tensor,
    time_ids: torch.Tensor,
    valid: torch.Tensor,
    video_token_id: int,
    audio_token_id: int,
) -> RowPlan:
    """Builds the plan of one row from its ids and time ids.

    Args:
        input_ids: int ``[L]`` token ids.
        time_ids: int ``[L]`` row 0 of the TMRoPE position ids.
        valid: bool ``[L]``, False at padding.
        video_token_id: id of the video placeholder token.
        audio_token_id: id of the audio placeholder token.

    Returns:
        The row's :class:`RowPlan`.
    """
    video = torch.nonzero((input_ids == video_token_id) & valid).flatten()
    audio = torch.nonzero((input_ids == audio_token_id) & valid).flatten()
    video_times = time_ids[video]
    audio_times = time_ids[audio]
    # 1. Frames: the distinct time ids of the video tokens, ascending.
    frame_times = sorted(set(video_times.tolist()))
    frames = [video[video_times == t] for t in frame_times]
    # The last window ends after the row's largest time id, so it takes all trailing audio.
    row_end = int(time_ids[valid].max()) + 1 if bool(valid.any()) else 0
    chunks = []
    # 2. Pair frames in order: chunk c = frames (2c, 2c+1); the last may have one frame.
    for first in range(0, len(frames), 2):
        # 3. The window runs from the chunk's first frame to the next chunk's first frame.
        start = frame_times[first]
        end = frame_times[first + 2] if first + 2 < len(frames) else row_end
        # 4. The chunk's audio: the row's audio tokens whose time id is in the window.
        in_window = (audio_times >= start) & (audio_times < end)
        chunks.append(ChunkPlan(frames=frames[first : first + 2], audio=audio[in_window], window=(start, end)))
    return RowPlan(video=video, audio=audio, frame_times=frame_times, chunks=chunks)


def check_time_ids(op: str, row: int, input_ids: torch.Tensor, time_ids: torch.Tensor, valid: torch.Tensor,
                   video_token_id: int, audio_token_id: int) -> None:
    """The layout rule on time ids, for one row, token by token (spec §1, **[ours]**).

    Video and audio tokens have time ids in ``[0, 2**40)``; along the row, a video token's time id is
    never below an earlier video token's: every frame's tokens share one time id and frames come in time
    order, so "the distinct time ids, ascending" (§2) is also the order of the frames in the sequence.
    Padding (``valid`` False) is not checked.

    Raises:
        ValueError: naming ``op``, the row and column of the first violation.
    """
    prev_col, prev_time = -1, -1
    for col in range(input_ids.shape[0]):
        token = int(input_ids[col])
        if not bool(valid[col]) or token not in (video_token_id, audio_token_id):
            continue
        time = int(time_ids[col])
        if not 0 <= time < TIME_ID_LIMIT:
            raise time_id_range_error(op, row, col, time)
        if token == video_token_id:
            if time < prev_time:
                raise time_id_order_error(op, row, col, time, prev_col, prev_time)
            prev_col, prev_time = col, time
