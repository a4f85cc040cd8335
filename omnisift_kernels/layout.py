"""Host-side layout of omni-modal rows: the media items a processor knows before any tensor exists.

A row is a list of items (:class:`Text`, :class:`Video`, :class:`Audio`, :class:`Image`) in sequence
order, laid out as Qwen2.5-Omni does (spec §1). The synthetic builder turns items into tensors; the
fast pipeline turns them (``grid=``) into every size it needs without reading the device.
"""

from __future__ import annotations

import dataclasses
import numbers
import struct
from typing import Union

TOKENS_PER_SECOND = 25  # audio tokens per second = TMRoPE time ids per second
SECONDS_PER_CHUNK = 2


def _f32(x: float) -> float:
    """``x`` rounded to float32 (round to nearest even), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _check_counts(item, *names: str, optional: tuple[str, ...] = ()) -> None:
    """Every named field of a layout item is a non-negative int (``optional`` ones may be None)."""
    for name in names + optional:
        value = getattr(item, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{type(item).__name__}: {name} must be a non-negative int, got "
                             f"{type(value).__name__} {value!r}")


@dataclasses.dataclass(frozen=True)
class Text:
    """``tokens`` plain text tokens (positions advance by one)."""

    tokens: int

    def __post_init__(self) -> None:
        _check_counts(self, "tokens")


@dataclasses.dataclass(frozen=True)
class Video:
    """A video clip at 2 fps: ``seconds`` temporal grids of ``frame_h x frame_w`` LLM tokens.

    Attributes:
        seconds: number of frames (temporal grids), one per second.
        frame_h: LLM tokens per frame along the height (H / 28).
        frame_w: LLM tokens per frame along the width (W / 28).
        audio_tokens: audio tokens of the clip's sound track (None: 25 per second; 0: no audio,
            i.e. a video without audio laid out without audio chunks).
        second_per_grid: seconds per temporal grid (the processor's ``video_second_per_grid``; 1.0 at
            the default 2 fps). Frame g's time id is ``int(g * second_per_grid * 25)`` after the start,
            computed in float32 as transformers' ``get_rope_index`` does. Only the host-side sizes
            (:func:`omnisift_kernels.plan.sizes_from_grid`) read it; the synthetic builder lays frames
            out at 1.0.
    """

    seconds: int
    frame_h: int
    frame_w: int
    audio_tokens: int | None = None
    second_per_grid: float = 1.0

    def __post_init__(self) -> None:
        _check_counts(self, "seconds", "frame_h", "frame_w", optional=("audio_tokens",))
        spg = self.second_per_grid
        if isinstance(spg, bool) or not isinstance(spg, numbers.Real) or not (0 < float(spg) < float("inf")):
            raise ValueError(f"Video: second_per_grid must be a positive finite number, got "
                             f"{type(spg).__name__} {spg!r}")

    def frame_offsets(self) -> list[int]:
        """Time id of every frame relative to the clip's first (``int(g * second_per_grid * 25)`` in
        float32, as transformers computes TMRoPE time ids).

        Plain Python (no numpy), so ``sizes_from_grid`` stays traceable by ``torch.compile``: at the
        default 1.0 the ids are ``25 * g``; otherwise each float32 product is emulated exactly (the
        product of two float32 values is exact in a double, then rounded to float32).
        """
        if float(self.second_per_grid) == 1.0:
            return [TOKENS_PER_SECOND * g for g in range(self.seconds)]
        spg = _f32(float(self.second_per_grid))
        return [int(_f32(_f32(_f32(float(g)) * spg) * TOKENS_PER_SECOND)) for g in range(self.seconds)]

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_h * self.frame_w

    @property
    def num_audio(self) -> int:
        return self.seconds * TOKENS_PER_SECOND if self.audio_tokens is None else self.audio_tokens


@dataclasses.dataclass(frozen=True)
class Audio:
    """A stand-alone audio clip of ``tokens`` tokens (no video)."""

    tokens: int

    def __post_init__(self) -> None:
        _check_counts(self, "tokens")


@dataclasses.dataclass(frozen=True)
class Image:
    """An image of ``h x w`` LLM tokens (never pruned)."""

    h: int
    w: int

    def __post_init__(self) -> None:
        _check_counts(self, "h", "w")


Item = Union[Text, Video, Audio, Image]


def row_length(items: list[Item]) -> int:
    """Number of tokens a row of ``items`` takes."""
    n = 0
    for it in items:
        if isinstance(it, Text):
            n += it.tokens
        elif isinstance(it, Video):
            n += it.seconds * it.tokens_per_frame + it.num_audio + (4 if it.num_audio else 2)
        elif isinstance(it, Audio):
            n += it.tokens + 2
        elif isinstance(it, Image):
            n += it.h * it.w + 2
    return n
