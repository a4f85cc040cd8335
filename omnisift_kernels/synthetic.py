"""Synthetic omni-modal batches laid out exactly as Qwen2.5-Omni lays them out.

Tests and benchmarks share this builder. Layout (spec §1, ``use_audio_in_video=True``): text,
``<|vision_bos|><|audio_bos|>`` (one shared position id), then 2-second chunks of that chunk's video
frames followed by that chunk's audio tokens, leftover audio chunks after the last video chunk,
``<|audio_eos|><|vision_eos|>`` (both at max + 1), text. Video frame g of a clip has time id
``st + 25 g``, audio token k has ``st + k``; height/width rows carry the frame's (h, w) grid.

Every named workload of ``shared/spec/workloads.md`` is in :data:`WORKLOADS`.
"""

from __future__ import annotations

import dataclasses
import torch

from .layout import SECONDS_PER_CHUNK, TOKENS_PER_SECOND, Audio, Image, Item, Text, Video, row_length

# Default ids of the Qwen2.5-Omni-7B config.
AUDIO_TOKEN_ID = 151646
AUDIO_BOS_ID = 151647
AUDIO_EOS_ID = 151648
VISION_BOS_ID = 151652
VISION_EOS_ID = 151653
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
PAD_TOKEN_ID = 151643
TEXT_VOCAB = 151000  # plain text ids are drawn below the special tokens





@dataclasses.dataclass
class SyntheticBatch:
    """A batch as the thinker's merge step produces it.

    Attributes:
        inputs_embeds: ``[B, L, D]``.
        input_ids: int64 ``[B, L]``.
        position_ids: int64 ``[3, B, L]`` TMRoPE ids.
        attention_mask: int64 ``[B, L]`` (right padding).
        labels: int64 ``[B, L]``: the text after the last media item, -100 elsewhere.
        rows: the items of every row (the host-side layout).
        video_token_id: id of video placeholders.
        audio_token_id: id of audio placeholders.
    """

    inputs_embeds: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rows: list[list[Item]]
    video_token_id: int = VIDEO_TOKEN_ID
    audio_token_id: int = AUDIO_TOKEN_ID

    def compress_kwargs(self) -> dict:
        """Keyword arguments for :func:`omnisift_kernels.compress` (besides ratios and selector)."""
        return dict(
            inputs_embeds=self.inputs_embeds,
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            attention_mask=self.attention_mask,
            labels=self.labels,
            video_token_id=self.video_token_id,
            audio_token_id=self.audio_token_id,
        )


class _RowBuilder:
    """Appends tokens of one row: ids, 3-row positions and a kind tag for the embeddings."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[tuple[int, int, int]] = []
        self.kind: list[tuple[str, int, int]] = []  # (kind, group, index in group) for embeddings
        self.next_pos = 0
        self.label_from = 0

    def _max_pos(self) -> int:
        return max((max(p) for p in self.pos), default=-1)

    def add(self, token_id: int, pos: tuple[int, int, int], kind=("text", 0, 0)) -> None:
        self.ids.append(token_id)
        self.pos.append(pos)
        self.kind.append(kind)

    def text(self, n: int, gen: torch.Generator) -> None:
        for tok in torch.randint(0, TEXT_VOCAB, (n,), generator=gen).tolist():
            self.add(tok, (self.next_pos,) * 3)
            self.next_pos += 1

    def _close(self, ids: tuple[int, ...]) -> None:
        end = self._max_pos() + 1
        for i in ids:
            self.add(i, (end,) * 3)
        self.next_pos = end + 1

    def video(self, clip: Video, clip_index: int) -> None:
        with_audio = clip.num_audio > 0
        st = self.next_pos
        self.add(VISION_BOS_ID, (st,) * 3)
        if with_audio:
            self.add(AUDIO_BOS_ID, (st,) * 3)
        st += 1
        per_chunk = TOKENS_PER_SECOND * SECONDS_PER_CHUNK
        n_chunks = max(-(-clip.seconds // SECONDS_PER_CHUNK), -(-clip.num_audio // per_chunk))
        for c in range(n_chunks):
            for g in range(SECONDS_PER_CHUNK * c, min(SECONDS_PER_CHUNK * (c + 1), clip.seconds)):
                for i in range(clip.frame_h):
                    for j in range(clip.frame_w):
                        self.add(
                            VIDEO_TOKEN_ID,
                            (st + TOKENS_PER_SECOND * g, st + i, st + j),
                            ("video", clip_index * 100_000 + g, i * clip.frame_w + j),
                        )
            for k in range(per_chunk * c, min(per_chunk * (c + 1), clip.num_audio)):
                self.add(AUDIO_TOKEN_ID, (st + k,) * 3, ("audio", clip_index * 100_000 + k // per_chunk, k))
        self._close((AUDIO_EOS_ID, VISION_EOS_ID) if with_audio else (VISION_EOS_ID,))

    def audio(self, clip: Audio, clip_index: int) -> None:
        st = self.next_pos
        self.add(AUDIO_BOS_ID, (st,) * 3)
        for k in range(clip.tokens):
            self.add(AUDIO_TOKEN_ID, (st + 1 + k,) * 3, ("audio", clip_index * 100_000 + k // 50, k))
        self._close((AUDIO_EOS_ID,))

    def image(self, img: Image) -> None:
        st = self.next_pos
        self.add(VISION_BOS_ID, (st,) * 3)
        for i in range(img.h):
            for j in range(img.w):
                self.add(IMAGE_TOKEN_ID, (st + 1, st + 1 + i, st + 1 + j))
        self._close((VISION_EOS_ID,))


def _embed_row(kinds: list[tuple[str, int, int]], d_model: int, gen: torch.Generator) -> torch.Tensor:
    """Embeddings with a per-frame shared component drifting from frame to frame, a per-position
    component drifting the same way, and noise; audio with a per-chunk component."""
    n = len(kinds)
    out = torch.randn(n, d_model, generator=gen)
    frame_mean: dict[int, torch.Tensor] = {}
    position_part: dict[tuple[int, int], torch.Tensor] = {}
    prev_mean = torch.randn(d_model, generator=gen)
    chunk_part: dict[int, torch.Tensor] = {}
    for t, (kind, group, idx) in enumerate(kinds):
        if kind == "video":
            if group not in frame_mean:
                prev_mean = 0.8 * prev_mean + 0.6 * torch.randn(d_model, generator=gen)
                frame_mean[group] = prev_mean
            clip = group // 100_000
            prev = position_part.get((clip, idx))
            fresh = torch.randn(d_model, generator=gen)
            part = fresh if prev is None else 0.85 * prev + 0.53 * fresh
            position_part[(clip, idx)] = part
            out[t] = frame_mean[group] + 0.9 * part + 0.5 * out[t]
        elif kind == "audio":
            if group not in chunk_part:
                chunk_part[group] = torch.randn(d_model, generator=gen)
            out[t] = 0.7 * chunk_part[group] + out[t]
    return out


def make_batch(
    rows: list[list[Item]],
    d_model: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SyntheticBatch:
    """Builds a right-padded batch from per-row item lists.

    Args:
        rows: one list of :class:`Text` / :class:`Video` / :class:`Audio` / :class:`Image` per row.
        d_model: embedding width D.
        dtype: embedding dtype.
        device: where the tensors go.
        seed: makes ids and embeddings reproducible.

    Returns:
        A :class:`SyntheticBatch`.
    """
    if not rows:
        raise ValueError("make_batch: rows must hold at least one row, got an empty list")
    gen = torch.Generator().manual_seed(seed)
    built = []
    for items in rows:
        rb = _RowBuilder()
        clip_index = 0
        for item in items:
            if isinstance(item, Text):
                rb.text(item.tokens, gen)
            elif isinstance(item, Video):
                rb.video(item, clip_index)
                clip_index += 1
            elif isinstance(item, Audio):
                rb.audio(item, clip_index)
                clip_index += 1
            elif isinstance(item, Image):
                rb.image(item)
            else:
                raise TypeError(f"make_batch: unknown row item {item!r}")
        rb.label_from = len(rb.ids)
        built.append(rb)
    L = max(len(rb.ids) for rb in built)
    B = len(built)
    input_ids = torch.full((B, L), PAD_TOKEN_ID, dtype=torch.int64)
    position_ids = torch.ones(3, B, L, dtype=torch.int64)
    attention_mask = torch.zeros(B, L, dtype=torch.int64)
    labels = torch.full((B, L), -100, dtype=torch.int64)
    embeds = torch.zeros(B, L, d_model)
    for b, rb in enumerate(built):
        n = len(rb.ids)
        input_ids[b, :n] = torch.tensor(rb.ids)
        position_ids[:, b, :n] = torch.tensor(rb.pos).reshape(n, 3).transpose(0, 1)
        attention_mask[b, :n] = 1
        embeds[b, :n] = _embed_row(rb.kind, d_model, gen)
        # Labels: the text after the last media item (the "answer").
        last_media = max((i for i, k in enumerate(rb.ids) if k in (VISION_EOS_ID, AUDIO_EOS_ID)), default=-1)
        ans = torch.arange(n) > last_media
        labels[b, :n] = torch.where(ans, input_ids[b, :n], torch.tensor(-100))
    return SyntheticBatch(
        inputs_embeds=embeds.to(device=device, dtype=dtype),
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=attention_mask.to(device),
        labels=labels.to(device),
        rows=[list(r) for r in rows],
    )


def clip_row(seconds: int, frame_h: int, frame_w: int, text_before: int = 15, text_after: int = 15) -> list[Item]:
    """A row of ``text, video-with-audio (seconds), text`` (about 30 text tokens in all)."""
    return [Text(text_before), Video(seconds, frame_h, frame_w), Text(text_after)]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named benchmark shape of ``shared/spec/workloads.md``."""

    name: str
    d_model: int
    rows: tuple[tuple[Item, ...], ...]
    about: str

    def build(self, *, dtype=torch.float32, device="cpu", seed: int = 0) -> SyntheticBatch:
        return make_batch([list(r) for r in self.rows], self.d_model, dtype=dtype, device=device, seed=seed)

    @property
    def num_tokens(self) -> int:
        """Total (unpadded) tokens, counted from the layout."""
        return sum(row_length(list(r)) for r in self.rows)


def _w(name, d, rows, about):
    return Workload(name, d, tuple(tuple(r) for r in rows), about)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        _w("tiny", 64, [clip_row(4, 4, 6), clip_row(3, 4, 6)], "tests and CPU smoke runs"),
        _w("omni3b-20s", 2048, [clip_row(20, 13, 23)], "Qwen2.5-Omni-3B, 320*28^2 pixel cap, 16:9"),
        _w("omni7b-20s", 3584, [clip_row(20, 13, 23)], "Qwen2.5-Omni-7B, the headline workload"),
        _w("omni7b-120s", 3584, [clip_row(120, 13, 23)], "long video (~39K tokens)"),
        _w(
            "omni7b-batch8",
            3584,
            [clip_row(s, 13, 23) for s in (8, 10, 12, 14, 16, 18, 20, 20)],
            "serving batch, different kept lengths per row",
        ),
        _w("omni7b-600s", 3584, [clip_row(600, 9, 16)], "scale: >100K tokens, T*D > 2^31"),
    ]
}
DEFAULT_WORKLOAD = "omni7b-20s"


def make_workload(name: str, *, dtype=torch.float32, device="cpu", seed: int = 0) -> SyntheticBatch:
    """Builds the named workload (one of :data:`WORKLOADS`) from a seed."""
    try:
        w = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"make_workload: unknown workload {name!r}; expected one of {sorted(WORKLOADS)}") from None
    return w.build(dtype=dtype, device=device, seed=seed)
