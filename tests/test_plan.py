"""The plan (stages 1-3: ``omnisift_kernels.plan`` and the extension's ``omnisift::build_plan_cpu`` /
``index_plan_cpu``): sizes against the readable reference's row plans (``reference.plan.plan_row``),
the C++ plan against the tensor-op plan element for element, and the host-side sizes of a grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnisift_kernels.layout import Audio, Image, Text, Video
from omnisift_kernels.plan import build_plan, read_sizes, sizes_from_grid
from omnisift_kernels.reference.compress import num_removed
from omnisift_kernels.reference.plan import plan_row
from omnisift_kernels.synthetic import clip_row, make_batch

from test_pipeline import D, ratios, rows


# ------------------------------------------------------------------------------------------------
# Sizes against the reference's row plans


def _reference_sizes(batch, rho_video):
    """num_video, num_audio, num_frames, num_chunks, num_video_kept, num_audio_assigned from
    ``plan_row`` and the spec's keep counts (§3: a frame keeps ``n - floor(n * rho_video)``; a chunk's
    second frame is pruned only when its size equals the first's, else kept whole)."""
    valid = batch.attention_mask.bool()
    totals = dict(num_video=0, num_audio=0, num_frames=0, num_chunks=0, num_video_kept=0, num_audio_assigned=0)
    for b in range(batch.input_ids.shape[0]):
        rp = plan_row(batch.input_ids[b], batch.position_ids[0, b], valid[b], batch.video_token_id,
                      batch.audio_token_id)
        totals["num_video"] += rp.video.numel()
        totals["num_audio"] += rp.audio.numel()
        totals["num_frames"] += len(rp.frame_times)
        totals["num_chunks"] += len(rp.chunks)
        for chunk in rp.chunks:
            first = chunk.frames[0].numel()
            totals["num_video_kept"] += first - num_removed(first, rho_video)
            if len(chunk.frames) == 2:
                second = chunk.frames[1].numel()
                totals["num_video_kept"] += second - num_removed(second, rho_video) if second == first else second
            totals["num_audio_assigned"] += chunk.audio.numel()
    return totals


@settings(max_examples=60, deadline=None)
@given(layout=st.lists(rows, min_size=1, max_size=3), rho=ratios, score_audio=st.booleans(), seed=st.integers(0, 99))
def test_plan_sizes_equal_reference_row_plans(layout, rho, score_audio, seed):
    batch = make_batch(layout, 4, seed=seed)
    plan = build_plan(batch.input_ids, batch.position_ids[0], batch.attention_mask.bool(),
                      video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id,
                      rho_video=rho[0], rho_audio=rho[1], score_audio=score_audio)
    sizes = dataclasses.asdict(read_sizes(plan))
    want = _reference_sizes(batch, rho[0])
    assert {k: sizes[k] for k in want} == want


# ------------------------------------------------------------------------------------------------
# The C++ plan (omnisift::build_plan_cpu) against the tensor-op plan: every buffer, element for element.

needs_cpu_plan = pytest.mark.skipif(not torch._C._dispatch_has_kernel("omnisift::build_plan_cpu"),
                                    reason="needs the extension")


def _assert_same_plan(input_ids, time_ids, valid, rho, score_audio, video_token_id, audio_token_id):
    from omnisift_kernels.plan import _PLAN_FIELDS, _build_plan_cpu, _build_plan_torch

    kw = dict(video_token_id=video_token_id, audio_token_id=audio_token_id, rho_video=rho[0], rho_audio=rho[1],
              score_audio=score_audio)
    want = _build_plan_torch(input_ids, time_ids, valid, **kw)
    got = _build_plan_cpu(input_ids, time_ids, valid, **kw)
    assert (got.batch, got.seqlen) == (want.batch, want.seqlen)
    for name in _PLAN_FIELDS:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
    # The stage-3 lists too: omnisift::index_plan_cpu against the tensor-op version.
    from omnisift_kernels.pipeline import IndexPlan, _index_plan_cpu, _index_plan_torch
    from omnisift_kernels.plan import read_sizes

    sizes = read_sizes(want, None)
    want_index, got_index = _index_plan_torch(want, sizes), _index_plan_cpu(want, sizes)
    for f in dataclasses.fields(IndexPlan):
        a, b = getattr(want_index, f.name), getattr(got_index, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape, (f.name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), f"{f.name}: {a.tolist()} != {b.tolist()}"


@needs_cpu_plan
@settings(max_examples=80, deadline=None)
@given(layout=st.lists(rows, min_size=1, max_size=3), rho=ratios, score_audio=st.booleans(), seed=st.integers(0, 99))
def test_cpu_plan_equals_tensor_plan(layout, rho, score_audio, seed):
    batch = make_batch(layout, 4, seed=seed)
    _assert_same_plan(batch.input_ids, batch.position_ids[0], batch.attention_mask.bool(), rho, score_audio,
                      batch.video_token_id, batch.audio_token_id)


@needs_cpu_plan
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_cpu_plan_equals_tensor_plan_on_arbitrary_ids(data):
    """Any ids, time ids (decreasing, repeated, negative) and padding: still the same buffers."""
    B = data.draw(st.integers(0, 4))
    L = data.draw(st.integers(0, 30))
    ints = lambda lo, hi: st.lists(st.integers(lo, hi), min_size=B * L, max_size=B * L)
    ids = torch.tensor(data.draw(ints(0, 3)), dtype=torch.int64).view(B, L)
    times = torch.tensor(data.draw(ints(-3, 12)), dtype=data.draw(st.sampled_from([torch.int64, torch.int32])))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L)),
                         dtype=torch.bool).view(B, L)
    rho = data.draw(ratios)
    _assert_same_plan(ids.to(data.draw(st.sampled_from([torch.int64, torch.int32]))), times.view(B, L), valid, rho,
                      data.draw(st.booleans()), 1, 2)


@needs_cpu_plan
def test_build_plan_uses_the_cpu_kernel_on_cpu(monkeypatch):
    import omnisift_kernels.plan as plan_mod

    batch = make_batch([clip_row(4, 2, 3)], D, seed=2)
    called = []
    real = plan_mod._build_plan_cpu
    monkeypatch.setattr(plan_mod, "_build_plan_cpu", lambda *a, **k: called.append(1) or real(*a, **k))
    build_plan(batch.input_ids, batch.position_ids[0], batch.attention_mask.bool(),
               video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id, rho_video=0.5,
               rho_audio=0.5, score_audio=True)
    assert called == [1]



def test_sizes_from_grid_equal_device_sizes():
    layout = [
        [Text(3), Video(5, 2, 3, audio_tokens=140), Text(2)],
        [Text(1), Video(3, 2, 2), Video(2, 3, 3), Audio(30), Image(2, 2), Text(4)],
        [Text(7)],
    ]
    batch = make_batch(layout, D, seed=1)
    for rho in ((0.67, 0.4), (0.0, 0.0), (0.9, 0.9)):
        for score in (True, False):
            plan = build_plan(
                batch.input_ids, batch.position_ids[0], batch.attention_mask.bool(),
                video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id,
                rho_video=rho[0], rho_audio=rho[1], score_audio=score,
            )
            host, kept_rows = sizes_from_grid(layout, rho_video=rho[0], rho_audio=rho[1], score_audio=score)
            assert read_sizes(plan) == host
            assert plan.kept.tolist() == kept_rows


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.floats(0.01, 8.0, allow_nan=False, allow_infinity=False))
def test_frame_offsets_are_transformers_time_ids(grids, second_per_grid):
    """layout.Video's frame time ids equal transformers' float32 formula (get_rope_index)."""
    expected = (torch.arange(grids) * torch.tensor(second_per_grid, dtype=torch.float32) * 25).long().tolist()
    assert Video(grids, 2, 2, second_per_grid=second_per_grid).frame_offsets() == expected


def test_chunk_keep_counts_sum_to_the_grid_sizes():
    """chunk_keep_counts (the vLLM processor's placeholders) and sizes_from_grid apply one rule."""
    from omnisift_kernels.plan import chunk_keep_counts

    for item in (Video(5, 3, 4), Video(4, 2, 2, audio_tokens=0), Video(3, 2, 3, second_per_grid=2.0),
                 Video(6, 2, 2, audio_tokens=130, second_per_grid=0.5)):
        for rv, ra in ((0.0, 0.0), (0.7, 0.3), (0.77, 0.5)):
            counts = chunk_keep_counts([item], rho_video=rv, rho_audio=ra)
            sizes, kept = sizes_from_grid([[item]], rho_video=rv, rho_audio=ra, score_audio=True)
            bos_eos = 4 if item.num_audio else 2
            assert sum(c.video_kept + c.audio_kept for c in counts) == kept[0] - bos_eos
            assert sum(c.video_kept for c in counts) == sizes.num_video_kept
            assert sum(c.audio_tokens for c in counts) == item.num_audio
            # windows tile the time axis from the first frame; frames pair up in order
            assert [c.window[0] for c in counts] == item.frame_offsets()[::2]
            assert all(a.window[1] == b.window[0] for a, b in zip(counts, counts[1:]))
            assert [c.frames for c in counts] == [(f, min(f + 2, item.seconds)) for f in range(0, item.seconds, 2)]
    with pytest.raises(ValueError, match="second_per_grid"):
        Video(2, 2, 2, second_per_grid=0.0)
