"""Bad and edge inputs across the public API: one contract per input, the same on every backend.

Each case names what it passes and what must happen: either every backend raises the same error type
with a message naming the function or op and the argument, or every backend accepts it and returns
what an independent reference gives (the readable reference for ``compress`` and the modules, the
plain-torch formulas of ``omnisift_kernels.testing`` for the ops). Backends: ``reference``, ``cpu`` and
``triton`` (the Triton kernels under the interpreter) for ``compress`` and the modules; the torch/C++
CPU path and ``triton`` for the ops. Cases that could crash the process (out-of-bounds indices, a grid
that over-counts) run in a subprocess, one per backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from omnisift_kernels import (
    OmniSIFTCompressor,
    SpatioTemporalVideoPruner,
    VisionGuidedAudioSelector,
    compress,
    ops,
)
from omnisift_kernels.layout import Audio, Image, Text, Video
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.reference.topk import segmented_topk_mask as reference_topk_mask
from omnisift_kernels.reference.video import frame_pair_similarity as reference_pair_similarity
from omnisift_kernels.reference.video import frame_saliency as reference_frame_saliency
from omnisift_kernels.reference.video import video_scores as reference_video_scores
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE, triton_on_cpu

D = 16
API = "omnisift_kernels.compress"
COMPRESS_BACKENDS = ("reference", "cpu", "triton")
OP_BACKENDS = ("cpu", "triton")


def _triton_usable() -> bool:
    return TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _selector() -> VisionGuidedAudioSelector:
    torch.manual_seed(0)
    return VisionGuidedAudioSelector(D, num_heads=2, hidden_dim=8).eval()


def _batch(rows=None, **kw):
    rows = rows or [clip_row(4, 2, 3, 3, 2), [Text(3), Video(3, 2, 2), Text(2), Audio(7)]]
    return make_batch(rows, D, seed=3, **kw)


def _compress(backend: str, batch=None, **over):
    """``compress`` on the base batch (two ragged rows, selector, paper-35) with ``over`` replacing args."""
    batch = batch or _batch()
    kw = dict(batch.compress_kwargs(), rho_video=0.67, rho_audio=0.4, selector=_selector(), backend=backend)
    kw.update(over)
    with torch.no_grad():
        return compress(**kw)


def _with_time(fn, batch=None):
    """``batch`` (default: the base batch) with its time ids (position_ids[0]) edited by ``fn``."""
    batch = batch or _batch()
    pos = batch.position_ids.clone()
    fn(pos[0], batch.input_ids, batch.video_token_id, batch.audio_token_id)
    return dict(position_ids=pos)


def _set_video_times(times, ids, vid, aid, row=0, values=None):
    cols = (ids[row] == vid).nonzero().flatten()
    times[row, cols] = values(cols.numel()) if callable(values) else values


def _swap_first_two_frames(times, ids, vid, aid):
    cols = (ids[0] == vid).nonzero().flatten()
    t = times[0, cols]
    first, second = t == t[0], t == t[t != t[0]][0]
    t2 = t.clone()
    t2[first], t2[second] = t[second][0], t[first][0]
    times[0, cols] = t2


def _interleave_frames(times, ids, vid, aid):
    cols = (ids[0] == vid).nonzero().flatten()
    t = times[0, cols]
    first = int(t[0])
    second = int(t[t != first][0])
    t2 = t.clone()
    t2[: 6] = torch.tensor([first, second] * 3)  # frames 1 and 2 (6 tokens each) alternate
    t2[6:12] = torch.tensor([first, second] * 3)
    times[0, cols] = t2


def _shuffle_audio_times(times, ids, vid, aid):
    cols = (ids[0] == aid).nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    times[0, cols] = times[0, cols][torch.randperm(cols.numel(), generator=g)]


@dataclasses.dataclass
class Case:
    """One input and its contract.

    Attributes:
        name: what is passed.
        run: ``backend -> result`` (the call under test).
        error: ``(type, regex)`` every backend raises, or None: accepted.
        expect: for accepted cases, ``backend -> reference result`` compared with :func:`_same` (None:
            the ``reference`` backend's result).
        kind: ``"compress"`` (backends reference/cpu/triton) or ``"op"`` (cpu/triton).
        crashy: run in a subprocess (an out-of-bounds read before the contract existed).
    """

    name: str
    run: Callable[[str], Any]
    error: tuple[type, str] | None = None
    expect: Callable[[str], Any] | None = None
    kind: str = "compress"
    crashy: bool = False


CASES: list[Case] = []


def case(name, run, error=None, **kw):
    CASES.append(Case(name, run, error, **kw))


def rejects(exc, *words):
    """An error of type ``exc`` whose message contains every one of ``words`` (regex-escaped)."""
    import re

    return exc, "".join(f"(?=[\\s\\S]*{re.escape(w)})" for w in words)


# ---- compress: types, shapes, dtypes ---------------------------------------------------------------
B0 = _batch()
case("rho_video=1.0", lambda be: _compress(be, rho_video=1.0), rejects(ValueError, API, "rho_video"))
case("rho_audio=-0.1", lambda be: _compress(be, rho_audio=-0.1), rejects(ValueError, API, "rho_audio"))
case("rho_video=nan", lambda be: _compress(be, rho_video=float("nan")), rejects(ValueError, API, "rho_video"))
case("rho_audio='0.4'", lambda be: _compress(be, rho_audio="0.4"), rejects(TypeError, API, "rho_audio"))
case("rho_video=True", lambda be: _compress(be, rho_video=True), rejects(TypeError, API, "rho_video"))
case("rho_video numpy float", lambda be: _compress(be, rho_video=__import__("numpy").float64(0.67)))
case("inputs_embeds a list", lambda be: _compress(be, inputs_embeds=B0.inputs_embeds.tolist()),
     rejects(TypeError, API, "inputs_embeds"))
case("inputs_embeds int64", lambda be: _compress(be, inputs_embeds=B0.inputs_embeds.long()),
     rejects(TypeError, API, "inputs_embeds"))
case("inputs_embeds 2-D", lambda be: _compress(be, inputs_embeds=B0.inputs_embeds[0]),
     rejects(ValueError, API, "inputs_embeds"))
case("inputs_embeds transposed (strided)", lambda be: _compress(
    be, inputs_embeds=B0.inputs_embeds.transpose(1, 2).contiguous().transpose(1, 2)))
case("inputs_embeds bf16", lambda be: _compress(be, inputs_embeds=B0.inputs_embeds.bfloat16()))
case("input_ids float", lambda be: _compress(be, input_ids=B0.input_ids.float()), rejects(TypeError, API, "input_ids"))
case("input_ids int16 (would wrap 151656)", lambda be: _compress(be, input_ids=B0.input_ids.to(torch.int16)),
     rejects(TypeError, API, "input_ids", "int32 or int64"))
case("input_ids uint8", lambda be: _compress(be, input_ids=B0.input_ids.to(torch.uint8)),
     rejects(TypeError, API, "input_ids"))
case("input_ids int32", lambda be: _compress(be, input_ids=B0.input_ids.int()))
case("input_ids wrong shape", lambda be: _compress(be, input_ids=B0.input_ids[:, 1:]),
     rejects(ValueError, API, "input_ids", "shape"))
case("position_ids [B, L]", lambda be: _compress(be, position_ids=B0.position_ids[0]),
     rejects(ValueError, API, "position_ids", "shape"))
case("position_ids float", lambda be: _compress(be, position_ids=B0.position_ids.float()),
     rejects(TypeError, API, "position_ids"))
case("position_ids int32", lambda be: _compress(be, position_ids=B0.position_ids.int()))
case("attention_mask float", lambda be: _compress(be, attention_mask=B0.attention_mask.float()),
     rejects(TypeError, API, "attention_mask"))
case("attention_mask wrong shape", lambda be: _compress(be, attention_mask=B0.attention_mask[:1]),
     rejects(ValueError, API, "attention_mask"))
case("attention_mask bool", lambda be: _compress(be, attention_mask=B0.attention_mask.bool()))
case("attention_mask None, labels None", lambda be: _compress(be, attention_mask=None, labels=None,
                                                               batch=_batch([clip_row(2, 2, 2)])))
case("labels wrong shape", lambda be: _compress(be, labels=B0.labels[:, :-1]), rejects(ValueError, API, "labels"))
case("labels float", lambda be: _compress(be, labels=B0.labels.float()), rejects(TypeError, API, "labels"))
case("video_token_id == audio_token_id", lambda be: _compress(be, audio_token_id=B0.video_token_id),
     rejects(ValueError, API, "video_token_id", "audio_token_id"))
case("video_token_id float", lambda be: _compress(be, video_token_id=151656.0),
     rejects(TypeError, API, "video_token_id"))
case("video_token_id 2**70", lambda be: _compress(be, video_token_id=2**70), rejects(ValueError, API, "video_token_id"))
case("audio_token_id -1 (no audio)", lambda be: _compress(be, audio_token_id=-1))
case("output='middle'", lambda be: _compress(be, output="middle"), rejects(ValueError, API, "output"))
case("output='left'", lambda be: _compress(be, output="left"))
case("backend='gpu'", lambda be: _compress("gpu"), rejects(ValueError, API, "backend"))
case("selector a dict", lambda be: _compress(be, selector={}), rejects(TypeError, API, "selector"))
case("selector of another width", lambda be: _compress(be, selector=VisionGuidedAudioSelector(8, 2, 8)),
     rejects(ValueError, API, "selector", "d_model"))
case("inputs on the meta device", lambda be: _compress(be, inputs_embeds=B0.inputs_embeds.to("meta"),
                                                       input_ids=B0.input_ids.to("meta"),
                                                       position_ids=B0.position_ids.to("meta"),
                                                       attention_mask=B0.attention_mask.to("meta"),
                                                       labels=B0.labels.to("meta")),
     rejects(ValueError, API, "inputs_embeds", "CPU or CUDA"))
case("selector on the meta device", lambda be: _compress(be, selector=VisionGuidedAudioSelector(D, 2, 8).to("meta")),
     rejects(ValueError, API, "selector", "meta"))
case("selector in float64, embeddings in float32", lambda be: _compress(be, selector=_selector().double()))
case("attention_mask with 2s and -1s (nonzero = valid)", lambda be: _compress(
    be, attention_mask=B0.attention_mask * torch.tensor([[2], [-1]])))
case("input_ids beyond int32 (match nothing)", lambda be: _compress(be, input_ids=B0.input_ids + 2**33))
case("labels int32", lambda be: _compress(be, labels=B0.labels.int()))
case("rho 0 for both", lambda be: _compress(be, rho_video=0.0, rho_audio=0.0))
case("rho 0.999 for both", lambda be: _compress(be, rho_video=0.999, rho_audio=0.999))
case("D = 1 without selector", lambda be: _compress(be, inputs_embeds=B0.inputs_embeds[..., :1].contiguous(),
                                                    selector=None))
case("VisionGuidedAudioSelector(d_model=True)", lambda be: VisionGuidedAudioSelector(True),
     rejects(ValueError, "VisionGuidedAudioSelector", "d_model"))
case("validate='yes'", lambda be: _compress(be, validate="yes"), rejects(TypeError, API, "validate"))

# ---- compress: values ---------------------------------------------------------------------------------


def _poisoned(value):
    x = B0.inputs_embeds.clone()
    x[0, 9, 3] = value  # a video token
    y = x.clone()
    y[1, 2, 0] = value  # a text token
    return x, y


case("NaN in a video row", lambda be: _compress(be, inputs_embeds=_poisoned(float("nan"))[0]),
     rejects(ValueError, API, "inputs_embeds", "NaN or Inf"))
case("Inf in a text row", lambda be: _compress(be, inputs_embeds=_poisoned(float("inf"))[1]),
     rejects(ValueError, API, "inputs_embeds", "NaN or Inf"))
case("zero embeddings (cosine of zero vectors)", lambda be: _compress(be, inputs_embeds=torch.zeros_like(B0.inputs_embeds)))
case("negative time ids at video tokens", lambda be: _compress(be, **_with_time(
    lambda t, ids, v, a: _set_video_times(t, ids, v, a, values=-5))), rejects(ValueError, API, "position_ids[0]", "[0, 2**40)"))
case("time ids >= 2**40", lambda be: _compress(be, **_with_time(
    lambda t, ids, v, a: t.add_(1 << 40))), rejects(ValueError, API, "position_ids[0]", "[0, 2**40)"))
case("frames out of time order", lambda be: _compress(be, **_with_time(_swap_first_two_frames)),
     rejects(ValueError, API, "position_ids[0]", "decrease", "row 0"))
case("interleaved frames", lambda be: _compress(be, **_with_time(_interleave_frames)),
     rejects(ValueError, API, "position_ids[0]", "decrease"))
case("audio time ids in any order", lambda be: _compress(be, **_with_time(_shuffle_audio_times)))
case("negative time ids at padding only", lambda be: _compress(be, **_with_time(
    lambda t, ids, v, a: t[1].masked_fill_(B0.attention_mask[1] == 0, -7))))
case("one time id for all video tokens (one frame)", lambda be: _compress(be, **_with_time(
    lambda t, ids, v, a: _set_video_times(t, ids, v, a, values=4))))
TWO_VIDEOS = _batch([[Text(2), Video(2, 2, 2, audio_tokens=0), Text(1), Video(2, 2, 2, audio_tokens=0)]])
case("two separate runs with equal time ids (one frame)", lambda be: _compress(be, batch=TWO_VIDEOS, **_with_time(
    lambda t, ids, v, a: _set_video_times(t, ids, v, a, values=torch.tensor([3] * 8 + [3] * 4 + [9] * 4)),
    TWO_VIDEOS)))
case("B = 0", lambda be: _compress(be, inputs_embeds=torch.zeros(0, 5, D), input_ids=torch.zeros(0, 5, dtype=torch.long),
                                   position_ids=torch.zeros(3, 0, 5, dtype=torch.long), attention_mask=None,
                                   labels=None))
case("B = 0, right padded", lambda be: _compress(be, inputs_embeds=torch.zeros(0, 5, D),
                                                 input_ids=torch.zeros(0, 5, dtype=torch.long),
                                                 position_ids=torch.zeros(3, 0, 5, dtype=torch.long),
                                                 attention_mask=None, labels=None, output="right"))
case("L = 0", lambda be: _compress(be, inputs_embeds=torch.zeros(2, 0, D), input_ids=torch.zeros(2, 0, dtype=torch.long),
                                   position_ids=torch.zeros(3, 2, 0, dtype=torch.long), attention_mask=None,
                                   labels=None))
case("all padding", lambda be: _compress(be, attention_mask=torch.zeros_like(B0.attention_mask)))
case("text only", lambda be: _compress(be, batch=_batch([[Text(9)], [Text(4)]])))
case("audio only (no anchors)", lambda be: _compress(be, batch=_batch([[Text(2), Audio(30)]])))
case("images only", lambda be: _compress(be, batch=_batch([[Text(2), Image(3, 4)]])))
case("video without audio", lambda be: _compress(be, batch=_batch([[Text(2), Video(3, 2, 3, audio_tokens=0)]])))

# ---- compress: grid= ----------------------------------------------------------------------------------
case("grid not a list", lambda be: _compress(be, grid="rows"), rejects(TypeError, API, "grid"))
case("grid with one row too few", lambda be: _compress(be, grid=B0.rows[:1]), rejects(ValueError, API, "grid", "2 rows"))
case("grid row not a list", lambda be: _compress(be, grid=[B0.rows[0], 7]), rejects(TypeError, API, "grid[1]"))
case("grid item of another type", lambda be: _compress(be, grid=[B0.rows[0], [Text(3), ("video", 3)]]),
     rejects(TypeError, API, "grid[1][1]"))
case("grid over-counting text", lambda be: _compress(be, grid=[B0.rows[0], [Text(30)] + B0.rows[1][1:]]),
     rejects(ValueError, API, "grid", "total_kept"), crashy=True)
case("grid under-counting video", lambda be: _compress(be, grid=[B0.rows[0], [Text(3), Video(2, 2, 2), Text(2), Audio(7)]]),
     rejects(ValueError, API, "grid", "num_video"), crashy=True)
case("grid with more frames than the tensors", lambda be: _compress(be, grid=[[Text(3), Video(9, 2, 3)], B0.rows[1]]),
     rejects(ValueError, API, "grid", "num_frames"), crashy=True)
case("grid with h and w swapped (same sizes)", lambda be: _compress(be, grid=[[Text(3), Video(4, 3, 2), Text(2)], B0.rows[1]]))
case("grid right", lambda be: _compress(be, grid=B0.rows))
case("grid on a layout violation", lambda be: _compress(be, grid=B0.rows, **_with_time(_swap_first_two_frames)),
     rejects(ValueError, API, "position_ids[0]", "decrease"))
case("Video(seconds=-1)", lambda be: Video(-1, 2, 2), rejects(ValueError, "Video", "seconds"))
case("Image(h=2.5)", lambda be: Image(2.5, 2), rejects(ValueError, "Image", "h"))

# ---- modules ------------------------------------------------------------------------------------------


def _module(be, cls=OmniSIFTCompressor, init=None, call=None):
    init = dict(d_model=D, num_heads=2, hidden_dim=8, preset="paper-35") if init is None else init
    torch.manual_seed(0)
    m = cls(**init, backend=be).eval()
    kw = dict(video_token_id=B0.video_token_id, audio_token_id=B0.audio_token_id)
    kw.update(call or {})
    with torch.no_grad():
        return m(B0.inputs_embeds, B0.input_ids, B0.position_ids, B0.attention_mask, B0.labels, **kw)


case("OmniSIFTCompressor(preset='paper-99')", lambda be: _module(be, init=dict(d_model=D, preset="paper-99")),
     rejects(ValueError, "paper-99"))
case("OmniSIFTCompressor(rho_audio=1.5)", lambda be: _module(be, init=dict(d_model=D, rho_audio=1.5)),
     rejects(ValueError, "OmniSIFTCompressor", "rho_audio"))
case("OmniSIFTCompressor(d_model=0)", lambda be: _module(be, init=dict(d_model=0)),
     rejects(ValueError, "VisionGuidedAudioSelector", "d_model"))
case("OmniSIFTCompressor(backend='tpu')", lambda be: OmniSIFTCompressor(D, backend="tpu"),
     rejects(ValueError, "OmniSIFTCompressor", "backend"))
case("OmniSIFTCompressor on inputs of another width",
     lambda be: _module(be, init=dict(d_model=2 * D, num_heads=2, hidden_dim=8)), rejects(ValueError, API, "d_model"))
case("OmniSIFTCompressor per-call rho_video=2", lambda be: _module(be, call=dict(rho_video=2.0)),
     rejects(ValueError, API, "rho_video"))
case("OmniSIFTCompressor forward", lambda be: _module(be))
case("SpatioTemporalVideoPruner(rho_video=-0.5)", lambda be: SpatioTemporalVideoPruner(-0.5),
     rejects(ValueError, "SpatioTemporalVideoPruner", "rho_video"))
case("SpatioTemporalVideoPruner forward", lambda be: _module(be, SpatioTemporalVideoPruner, dict(rho_video=0.5)))
case("VisionGuidedAudioSelector(num_heads=3)", lambda be: VisionGuidedAudioSelector(D, num_heads=3, hidden_dim=8),
     rejects(ValueError, "VisionGuidedAudioSelector"))

# ---- ops ----------------------------------------------------------------------------------------------
X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
TOK = torch.tensor([0, 1, 2, 5, 6, 7])
OFF = torch.tensor([0, 3, 6])
PAIR = torch.tensor([-1, -1, -1, 0, 1, 2])


def op(name, run, error=None, expect=None, crashy=False):
    case(name, run, error, expect=expect, kind="op", crashy=crashy)


op("video_scores", lambda be: ops.video_scores(X, TOK, OFF, PAIR), expect=lambda be: reference_video_scores(X, TOK, OFF, PAIR))
op("video_scores pair_index = -5 (the mean, as -1)", lambda be: ops.video_scores(X, TOK, OFF, PAIR.where(PAIR >= 0, -5)),
   expect=lambda be: reference_video_scores(X, TOK, OFF, PAIR))
op("video_scores repeated token_index", lambda be: ops.video_scores(X, torch.tensor([0, 0, 2, 5, 6, 6]), OFF, PAIR),
   expect=lambda be: reference_video_scores(X, torch.tensor([0, 0, 2, 5, 6, 6]), OFF, PAIR))
op("video_scores token_index >= B*L", lambda be: ops.video_scores(X, torch.tensor([0, 1, 10, 5, 6, 7]), OFF, PAIR),
   rejects(ValueError, "video_scores", "token_index", "[0, 10)"), crashy=True)
op("video_scores negative token_index", lambda be: ops.video_scores(X, torch.tensor([0, -1, 2, 5, 6, 7]), OFF, PAIR),
   rejects(ValueError, "video_scores", "token_index"), crashy=True)
op("video_scores pair_index >= B*L", lambda be: ops.video_scores(X, TOK, OFF, torch.tensor([-1, -1, -1, 0, 99, 2])),
   rejects(ValueError, "video_scores", "pair_index"), crashy=True)
op("video_scores seg_offsets not monotonic", lambda be: ops.video_scores(X, TOK, torch.tensor([0, 4, 2, 6]), PAIR),
   rejects(ValueError, "video_scores", "seg_offsets", "non-decreasing"), crashy=True)
op("video_scores seg_offsets past N", lambda be: ops.video_scores(X, TOK, torch.tensor([0, 3, 9]), PAIR),
   rejects(ValueError, "video_scores", "seg_offsets"), crashy=True)
op("video_scores seg_offsets not from 0", lambda be: ops.video_scores(X, TOK, torch.tensor([1, 3, 6]), PAIR),
   rejects(ValueError, "video_scores", "seg_offsets"), crashy=True)
op("video_scores int32 token_index", lambda be: ops.video_scores(X, TOK.int(), OFF, PAIR),
   rejects(TypeError, "video_scores", "token_index", "int64"))
op("video_scores pair_index of another length", lambda be: ops.video_scores(X, TOK, OFF, PAIR[:4]),
   rejects(ValueError, "video_scores", "pair_index"))
op("video_scores x int", lambda be: ops.video_scores(X.long(), TOK, OFF, PAIR), rejects(TypeError, "video_scores", "x"))
op("frame_saliency empty segments", lambda be: ops.frame_saliency(X, TOK, torch.tensor([0, 0, 3, 3, 6])),
   expect=lambda be: reference_frame_saliency(X, TOK, torch.tensor([0, 0, 3, 3, 6])))
op("frame_saliency zero rows", lambda be: ops.frame_saliency(torch.zeros(1, 4, 8), torch.arange(4), torch.tensor([0, 4])),
   expect=lambda be: torch.zeros(4))
op("frame_saliency token_index >= B*L", lambda be: ops.frame_saliency(X, TOK + 4, OFF),
   rejects(ValueError, "frame_saliency", "token_index"), crashy=True)
op("frame_saliency seg_offsets decreasing", lambda be: ops.frame_saliency(X, TOK, torch.tensor([0, 5, 4, 6])),
   rejects(ValueError, "frame_saliency", "seg_offsets"), crashy=True)
op("frame_pair_similarity negative first_index", lambda be: ops.frame_pair_similarity(X, torch.tensor([-3, 1]), torch.tensor([5, 6])),
   rejects(ValueError, "frame_pair_similarity", "first_index"), crashy=True)
op("frame_pair_similarity second_index >= B*L", lambda be: ops.frame_pair_similarity(X, torch.tensor([0, 1]), torch.tensor([5, 10])),
   rejects(ValueError, "frame_pair_similarity", "second_index"), crashy=True)
op("frame_pair_similarity", lambda be: ops.frame_pair_similarity(X, torch.tensor([0, 1]), torch.tensor([5, 6])),
   expect=lambda be: reference_pair_similarity(X, torch.tensor([0, 1]), torch.tensor([5, 6])))
op("segmented_topk_mask k < 0 and k > size", lambda be: ops.segmented_topk_mask(torch.tensor([0.5, 0.1, 0.9, 0.3]),
                                                                                 torch.tensor([0, 2, 4]), torch.tensor([-1, 7])),
   expect=lambda be: torch.tensor([False, False, True, True]))
op("segmented_topk_mask ties by index", lambda be: ops.segmented_topk_mask(torch.tensor([0.5, 0.5, 0.5, -0.0, 0.0]),
                                                                            torch.tensor([0, 5]), torch.tensor([2])),
   expect=lambda be: reference_topk_mask(torch.tensor([0.5, 0.5, 0.5, -0.0, 0.0]), torch.tensor([0, 5]), torch.tensor([2])))
op("segmented_topk_mask seg_offsets decreasing", lambda be: ops.segmented_topk_mask(torch.rand(4), torch.tensor([0, 3, 2, 4]),
                                                                                     torch.tensor([1, 1, 1])),
   rejects(ValueError, "segmented_topk_mask", "seg_offsets"), crashy=True)
op("segmented_topk_mask seg_offsets short of N", lambda be: ops.segmented_topk_mask(torch.rand(4), torch.tensor([0, 2, 3]),
                                                                                     torch.tensor([1, 1])),
   rejects(ValueError, "segmented_topk_mask", "seg_offsets"), crashy=True)
op("segmented_topk_mask float64 scores", lambda be: ops.segmented_topk_mask(torch.rand(4).double(), torch.tensor([0, 4]),
                                                                             torch.tensor([1])),
   rejects(TypeError, "segmented_topk_mask", "scores"))
op("segmented_topk_mask k of another length", lambda be: ops.segmented_topk_mask(torch.rand(4), torch.tensor([0, 4]),
                                                                                  torch.tensor([1, 1])),
   rejects(ValueError, "segmented_topk_mask", "seg_offsets"))
op("gather_ste", lambda be: ops.gather_ste(X, torch.tensor([9, 0, 4]), torch.zeros(2, 5)),
   expect=lambda be: X.flatten(0, 1)[[9, 0, 4]])
op("gather_ste index >= B*L", lambda be: ops.gather_ste(X, torch.tensor([0, 10]), torch.zeros(2, 5)),
   rejects(ValueError, "gather_ste", "indices", "[0, 10)"), crashy=True)
op("gather_ste negative index", lambda be: ops.gather_ste(X, torch.tensor([-1, 3]), torch.zeros(2, 5)),
   rejects(ValueError, "gather_ste", "indices"), crashy=True)
op("gather_ste repeated index", lambda be: ops.gather_ste(X, torch.tensor([3, 3]), torch.zeros(2, 5)),
   rejects(ValueError, "gather_ste", "indices", "distinct"))
op("gather_ste scores [B*L]", lambda be: ops.gather_ste(X, torch.tensor([3]), torch.zeros(10)),
   rejects(ValueError, "gather_ste", "scores"))
op("gather_ste empty indices", lambda be: ops.gather_ste(X, torch.zeros(0, dtype=torch.long), torch.zeros(2, 5)),
   expect=lambda be: torch.zeros(0, 8))
op("varlen_gather index out of range (documented: zero row)",
   lambda be: ops.varlen_gather(X[0], torch.tensor([4, 5, -1])), expect=lambda be: torch.cat([X[0, 4:5], torch.zeros(2, 8)]))
op("varlen_compact wrong total", lambda be: ops.varlen_compact(X, torch.ones(2, 5, dtype=torch.bool), total=3),
   rejects(ValueError, "varlen_compact", "total"))
op("varlen_compact keep int", lambda be: ops.varlen_compact(X, torch.ones(2, 5, dtype=torch.long)),
   rejects(TypeError, "varlen_compact", "keep"))


# ------------------------------------------------------------------------------------------------------
# Running the cases.


def _backends(c: Case) -> tuple[str, ...]:
    return COMPRESS_BACKENDS if c.kind == "compress" else OP_BACKENDS


def _run(c: Case, backend: str):
    if c.kind == "op":
        with triton_on_cpu(backend == "triton"):
            return c.run(backend)
    return c.run(backend)


def _same(got, want) -> str | None:
    """None when ``got`` equals ``want`` exactly (results of compress, or tensors), else what differs."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return f"shape {getattr(got, 'shape', None)} != {tuple(want.shape)}"
        if want.dtype == torch.bool or want.dtype == got.dtype and not want.is_floating_point():
            return None if torch.equal(got, want) else "values differ"
        ok = torch.allclose(got.double(), want.double(), atol=1e-5, rtol=1e-5)
        return None if ok else f"max abs diff {(got.double() - want.double()).abs().max().item():.3g}"
    if want is None:
        return None if got is None else f"{type(got).__name__} instead of None"
    if dataclasses.is_dataclass(want) and hasattr(want, "keep_mask"):
        for f in ("keep_mask", "inputs_embeds", "position_ids", "attention_mask", "labels", "indices",
                  "cu_seqlens", "rope_deltas", "video_kept", "video_total", "audio_kept", "audio_total"):
            a, b = getattr(got, f), getattr(want, f)
            if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or not torch.equal(a, b))):
                return f"field {f} differs"
        return None if got.max_seqlen == want.max_seqlen else "max_seqlen differs"
    return None if type(got) is type(want) else f"{type(got).__name__} != {type(want).__name__}"


def outcome(c: Case, backend: str) -> dict:
    """Runs ``c`` on ``backend`` and judges it against its contract: ``{"ok": bool, "detail": str}``."""
    try:
        got = _run(c, backend)
    except Exception as e:  # judged below against the expected error
        err = f"{type(e).__name__}: {e}"
        if c.error is None:
            return {"ok": False, "detail": f"accepted input raised {err}"}
        import re

        exc, pattern = c.error
        ok = isinstance(e, exc) and re.search(pattern, str(e)) is not None
        return {"ok": ok, "detail": err if ok else f"expected {exc.__name__} matching {pattern!r}, got {err}"}
    if c.error is not None:
        return {"ok": False, "detail": f"expected {c.error[0].__name__}, but the call returned"}
    want = c.expect(backend) if c.expect is not None else _run(c, "reference")
    diff = _same(got, want)
    return {"ok": diff is None, "detail": diff or "accepted, equal to the reference"}


def _skip_unavailable(backend: str) -> None:
    if backend == "triton" and not _triton_usable():
        pytest.skip("needs Triton and TRITON_INTERPRET=1")


PARAMS = [pytest.param(c, be, id=f"{c.name}-{be}") for c in CASES if not c.crashy for be in _backends(c)]


@pytest.mark.parametrize(("c", "backend"), PARAMS)
def test_contract(c: Case, backend: str):
    _skip_unavailable(backend)
    result = outcome(c, backend)
    assert result["ok"], f"{c.name} on {backend}: {result['detail']}"


def _child(backend: str) -> None:
    """Subprocess entry: runs every crashy case of ``backend``, one JSON line each (flushed first)."""
    for c in CASES:
        if c.crashy and backend in _backends(c):
            print(json.dumps({"case": c.name, "start": True}), flush=True)
            print(json.dumps({"case": c.name, **outcome(c, backend)}), flush=True)


@pytest.mark.parametrize("backend", sorted(set(COMPRESS_BACKENDS) | set(OP_BACKENDS)))
def test_contract_crash_prone(backend: str):
    """Out-of-bounds indices and over-counting grids, in a subprocess: a crash fails the case it hit."""
    _skip_unavailable(backend)
    names = [c.name for c in CASES if c.crashy and backend in _backends(c)]
    code = f"import runpy; runpy.run_path({str(Path(__file__))!r})['_child']({backend!r})"
    env = dict(os.environ)
    # The working directory and environment are the parent's: the child imports the same package.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    results = {}
    started = None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("start"):
                started = rec["case"]
            else:
                results[rec["case"]] = rec
    failures = []
    for name in names:
        if name not in results:
            failures.append(f"{name}: no result (the process ended with {proc.returncode} during "
                            f"{started!r}): {proc.stderr[-1500:]}")
        elif not results[name]["ok"]:
            failures.append(f"{name}: {results[name]['detail']}")
    assert not failures, f"{backend}:\n" + "\n".join(failures)


def test_matrix_size():
    """The matrix covers compress, the modules, every op and grid=: at least 40 cases."""
    assert len(CASES) >= 40
    names = " ".join(c.name for c in CASES)
    for needle in ("grid", "OmniSIFTCompressor", "SpatioTemporalVideoPruner", "video_scores", "frame_saliency",
                   "frame_pair_similarity", "segmented_topk_mask", "gather_ste", "varlen_"):
        assert needle in names, needle
