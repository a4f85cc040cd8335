"""The authors' release style of OmniSIFT, rewritten from the spec as the benchmark's baseline.

This is *not* a fast path and not the oracle: it mimics how the public release computes the
selection, so that the benchmark can report "speedup vs the release-style loop":

* one batch row at a time, one 2-second chunk at a time, in Python;
* boolean masks (``input_ids == token_id``) turned into positions with ``nonzero``;
* frame time ids and window ends read back with ``.item()`` (a device sync each on a GPU);
* ``topk`` for the video cuts and the audio cut (no stable tie rule: the release has none);
* one selector call per chunk (``selector(audio, video)``), no batching;
* the kept tokens gathered per row with a boolean mask and concatenated.

It follows ``shared/spec/omnisift.md`` §2-§4 (including our rules where the release crashes: a video
without audio only prunes video, frames of different sizes skip temporal pruning, no selector keeps
all audio). Where no two scores tie (every synthetic workload; the golden masks of
``shared/golden`` were checked to have large score gaps) its keep mask equals the reference's; the
benchmark verifies that before timing it.

The phases are separate functions (:func:`row_layout`, :func:`chunk_tokens`,
:func:`video_chunk_scores`, :func:`drop_by_topk`, :func:`score_chunk_audio`,
:func:`keep_by_topk`, :func:`gather_rows`) so the benchmark can time each stage of the same code;
:func:`release_loop_compress` interleaves them per chunk, as the release does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8


@dataclasses.dataclass
class RowLayout:
    """Positions and time ids of one row, as the release derives them."""

    video_idx: torch.Tensor  # int64 positions of video tokens
    audio_idx: torch.Tensor  # int64 positions of audio tokens
    video_t: torch.Tensor  # their time ids
    audio_t: torch.Tensor
    frame_times: list[int]  # distinct video time ids, ascending (read back with .item())
    row_end: int  # max time id of the row + 1


@dataclasses.dataclass
class ChunkTokens:
    """The token positions of one chunk."""

    first: torch.Tensor
    second: torch.Tensor | None
    audio: torch.Tensor


def row_layout(input_ids: torch.Tensor, time_ids: torch.Tensor, valid: torch.Tensor,
               video_token_id: int, audio_token_id: int) -> RowLayout:
    """Video/audio positions, frame time ids and the row end of one row (``[L]`` inputs)."""
    video_mask = (input_ids == video_token_id) & valid
    audio_mask = (input_ids == audio_token_id) & valid
    video_idx = video_mask.nonzero(as_tuple=True)[0]
    audio_idx = audio_mask.nonzero(as_tuple=True)[0]
    video_t = time_ids[video_idx]
    audio_t = time_ids[audio_idx]
    uniq = torch.unique(video_t)  # sorted ascending
    frame_times = [uniq[i].item() for i in range(uniq.numel())]  # one sync per frame, release style
    row_end = time_ids[valid].max().item() + 1 if valid.any().item() else 0
    return RowLayout(video_idx, audio_idx, video_t, audio_t, frame_times, row_end)


def num_chunks(layout: RowLayout) -> int:
    return (len(layout.frame_times) + 1) // 2


def chunk_tokens(layout: RowLayout, c: int) -> ChunkTokens:
    """Frames and audio of chunk ``c`` of a row."""
    ft = layout.frame_times
    t0 = ft[2 * c]
    first = layout.video_idx[layout.video_t == t0]
    second = layout.video_idx[layout.video_t == ft[2 * c + 1]] if 2 * c + 1 < len(ft) else None
    end = ft[2 * c + 2] if 2 * c + 2 < len(ft) else layout.row_end
    in_window = (layout.audio_t >= t0) & (layout.audio_t < end)
    return ChunkTokens(first, second, layout.audio_idx[in_window])


def video_chunk_scores(embeds: torch.Tensor, ch: ChunkTokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Spatial scores of the first frame and temporal scores of the second (None if not pruned)."""
    x = embeds[ch.first].float()
    s1 = F.cosine_similarity(x, x.mean(dim=0, keepdim=True), dim=-1, eps=COSINE_EPS)
    s2 = None
    if ch.second is not None and ch.second.numel() == ch.first.numel():
        s2 = F.cosine_similarity(embeds[ch.second].float(), x, dim=-1, eps=COSINE_EPS)
    return s1, s2


def drop_by_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep mask of a frame: the ``k`` most similar tokens are dropped (``topk``)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        _, drop = torch.topk(scores, k, largest=True)
        keep[drop] = False
    return keep


def score_chunk_audio(selector, embeds: torch.Tensor, audio: torch.Tensor, surviving: torch.Tensor) -> torch.Tensor:
    """One selector call for one chunk."""
    return selector(embeds[audio], embeds[surviving])


def keep_by_topk(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Boolean keep mask of a chunk's audio: the ``n_keep`` highest scores (``topk``)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    _, top = torch.topk(scores.float(), n_keep, largest=True)
    keep[top] = True
    return keep


def gather_rows(inputs_embeds: torch.Tensor, position_ids: torch.Tensor, keep_mask: torch.Tensor,
                labels: torch.Tensor | None = None):
    """Per-row boolean-mask gather, concatenated (packed ``[T, D]``, positions ``[3, T]``, labels)."""
    embeds, pos, labs = [], [], []
    for b in range(inputs_embeds.shape[0]):
        m = keep_mask[b]
        embeds.append(inputs_embeds[b][m])
        pos.append(position_ids[:, b][:, m])
        if labels is not None:
            labs.append(labels[b][m])
    return torch.cat(embeds), torch.cat(pos, dim=1), (torch.cat(labs) if labels is not None else None)


@torch.no_grad()
def release_loop_compress(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    video_token_id: int,
    audio_token_id: int,
    rho_video: float,
    rho_audio: float,
    selector=None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    gather: bool = True,
):
    """Release-style OmniSIFT on a batch. Returns ``(keep_mask [B, L] bool, packed or None)``.

    ``packed`` is ``(embeds [T, D], position_ids [3, T], labels [T] or None)`` when ``gather``.
    """
    B, L, _ = inputs_embeds.shape
    valid = (attention_mask.bool() if attention_mask is not None
             else torch.ones(B, L, dtype=torch.bool, device=inputs_embeds.device))
    keep_mask = valid.clone()
    for b in range(B):
        embeds = inputs_embeds[b]
        layout = row_layout(input_ids[b], position_ids[0, b], valid[b], video_token_id, audio_token_id)
        for c in range(num_chunks(layout)):
            ch = chunk_tokens(layout, c)
            k = int(ch.first.numel() * rho_video)
            s1, s2 = video_chunk_scores(embeds, ch)
            keep1 = drop_by_topk(s1, k)
            keep_mask[b, ch.first[~keep1]] = False
            surviving = [ch.first[keep1]]
            if ch.second is not None:
                if s2 is not None:
                    keep2 = drop_by_topk(s2, k)
                    keep_mask[b, ch.second[~keep2]] = False
                    surviving.append(ch.second[keep2])
                else:
                    surviving.append(ch.second)
            n_a = ch.audio.numel()
            surv = torch.cat(surviving)
            if selector is None or n_a < 2 or surv.numel() == 0:
                continue
            scores = score_chunk_audio(selector, embeds, ch.audio, surv)
            n_keep = n_a - int(n_a * rho_audio)
            keep_a = keep_by_topk(scores, n_keep)
            keep_mask[b, ch.audio[~keep_a]] = False
    packed = gather_rows(inputs_embeds, position_ids, keep_mask, labels) if gather else None
    return keep_mask, packed
