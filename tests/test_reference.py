"""The reference OmniSIFT (``compress(..., backend="reference")``) against the spec.

Hand-computed tiny cases, every edge case of spec §2/§9, keep counts against the formulas, ties,
validation, the output layouts and the straight-through estimator. Everything here is tiny (D <= 32)
so the whole file runs in a few seconds on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from omnisift_kernels import (
    StraightThroughKeep,
    VisionGuidedAudioSelector,
    compress,
    straight_through_keep,
)
from omnisift_kernels.reference import spatial_scores, temporal_scores
from omnisift_kernels.synthetic import (
    AUDIO_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    Audio,
    Image,
    Text,
    Video,
    clip_row,
    make_batch,
)

VID, AUD, TXT = VIDEO_TOKEN_ID, AUDIO_TOKEN_ID, 100


# ------------------------------------------------------------------------------------------------
# Helpers: an independent, plain-Python reading of spec §2-§4 (not the reference's plan_row).
# ------------------------------------------------------------------------------------------------
def spec_chunks(ids, times, valid, vid=VID, aid=AUD):
    """Chunks of one row as spec §2 defines them: ``[(frames, audio)]`` with lists of positions."""
    ids, times, valid = ids.tolist(), times.tolist(), [bool(v) for v in valid.tolist()]
    L = len(ids)
    video = [i for i in range(L) if valid[i] and ids[i] == vid]
    audio = [i for i in range(L) if valid[i] and ids[i] == aid]
    frame_times = sorted({times[i] for i in video})
    frames = [[i for i in video if times[i] == ft] for ft in frame_times]
    row_end = max(times[i] for i in range(L) if valid[i]) + 1 if any(valid) else 0
    chunks = []
    for c in range(0, len(frames), 2):
        start = frame_times[c]
        end = frame_times[c + 2] if c + 2 < len(frames) else row_end
        chunks.append((frames[c : c + 2], [i for i in audio if start <= times[i] < end]))
    return chunks


def check_row_counts(keep, ids, times, valid, rho_v, rho_a, scored=True, vid=VID, aid=AUD):
    """Asserts spec's keep counts for every frame and chunk of a row; returns (video, audio) kept."""
    keep = keep.tolist()
    chunks = spec_chunks(ids, times, valid, vid, aid)
    in_chunk = set()
    exp_v = exp_a = 0
    for frames, audio in chunks:
        n1 = len(frames[0])
        k = int(n1 * rho_v)
        got = sum(keep[i] for i in frames[0])
        assert got == n1 - k, f"first frame of {n1} tokens kept {got}, expected {n1 - k}"
        exp_v += n1 - k
        if len(frames) == 2:
            n2 = len(frames[1])
            want = n2 - k if n2 == n1 else n2
            got = sum(keep[i] for i in frames[1])
            assert got == want, f"second frame of {n2} (first {n1}) kept {got}, expected {want}"
            exp_v += want
        na = len(audio)
        want = na - int(na * rho_a) if (scored and na >= 2) else na
        got = sum(keep[i] for i in audio)
        assert got == want, f"chunk audio of {na} tokens kept {got}, expected {want}"
        exp_a += want
        in_chunk.update(audio)
        for f in frames:
            in_chunk.update(f)
    # Everything else: valid tokens survive, padding never does.
    for i, (v, t) in enumerate(zip(valid.tolist(), ids.tolist())):
        if i in in_chunk:
            continue
        assert keep[i] == bool(v), f"token {i} (id {t}, valid {v}) outside any chunk: keep={keep[i]}"
        if bool(v) and t == aid:
            exp_a += 1
    return exp_v, exp_a


def make_selector(d_model, seed=0, hidden_dim=16, num_heads=4):
    torch.manual_seed(seed)
    return VisionGuidedAudioSelector(d_model, num_heads=num_heads, hidden_dim=hidden_dim)


def run(batch, rho_v, rho_a, selector=None, output="packed"):
    return compress(
        **batch.compress_kwargs(), rho_video=rho_v, rho_audio=rho_a, selector=selector,
        output=output, backend="reference",
    )


def check_batch(batch, res, rho_v, rho_a, scored=True):
    for b in range(batch.input_ids.shape[0]):
        ev, ea = check_row_counts(
            res.keep_mask[b], batch.input_ids[b], batch.position_ids[0, b], batch.attention_mask[b],
            rho_v, rho_a, scored=scored,
        )
        assert int(res.video_kept[b]) == ev
        assert int(res.audio_kept[b]) == ea
        valid = batch.attention_mask[b].bool()
        assert int(res.video_total[b]) == int(((batch.input_ids[b] == VID) & valid).sum())
        assert int(res.audio_total[b]) == int(((batch.input_ids[b] == AUD) & valid).sum())


class ManualRow:
    """A hand-written single row: ``add(kind, time, vec)``; all three position rows = time."""

    def __init__(self, d):
        self.d = d
        self.ids, self.times, self.vecs = [], [], []

    def add(self, kind, time, vec=None):
        self.ids.append({"v": VID, "a": AUD, "t": TXT, "i": IMAGE_TOKEN_ID}[kind])
        self.times.append(time)
        self.vecs.append(torch.zeros(self.d) if vec is None else torch.as_tensor(vec, dtype=torch.float32))
        return len(self.ids) - 1

    def tensors(self):
        L = len(self.ids)
        x = torch.stack(self.vecs)[None]
        ids = torch.tensor(self.ids)[None]
        pos = torch.tensor(self.times).view(1, 1, L).expand(3, 1, L).contiguous()
        return x, ids, pos

    def compress(self, rho_v, rho_a, selector=None, **kw):
        x, ids, pos = self.tensors()
        return compress(
            x, ids, pos, video_token_id=VID, audio_token_id=AUD, rho_video=rho_v, rho_audio=rho_a,
            selector=selector, backend="reference", **kw,
        )


class FeatureSelector(VisionGuidedAudioSelector):
    """A selector whose score is sigmoid(audio[:, 0]) (monotone in a known feature)."""

    def forward(self, audio, video):  # noqa: D401
        assert video.shape[0] >= 1
        return torch.sigmoid(audio[:, 0].float())


class ConstantSelector(VisionGuidedAudioSelector):
    def forward(self, audio, video):
        return torch.full((audio.shape[0],), 0.5)


# ------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------
# a=(1,0,0) b=(1,.1,0) c=(0,0,1) d=(0,1,0); mean m=(.5,.275,.25), |m|=sqrt(.388125)=.62300
# cos: a=.8026 b=.8426 c=.4013 d=.4414 -> ranking of redundancy: b > a > d > c.
FRAME4 = [(1.0, 0.0, 0.0), (1.0, 0.1, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)]


def test_spatial_scores_match_hand_computation():
    x = torch.tensor(FRAME4)
    m = [sum(v[j] for v in FRAME4) / 4 for j in range(3)]
    nm = math.sqrt(sum(c * c for c in m))
    want = [sum(v[j] * m[j] for j in range(3)) / (math.sqrt(sum(c * c for c in v)) * nm) for v in FRAME4]
    torch.testing.assert_close(spatial_scores(x), torch.tensor(want), atol=1e-6, rtol=0)
    assert [round(w, 3) for w in want] == [0.803, 0.843, 0.401, 0.441]


@pytest.mark.parametrize(
    "rho, kept",
    [(0.0, [0, 1, 2, 3]), (0.25, [0, 2, 3]), (0.5, [2, 3]), (0.74, [2, 3]), (0.75, [2]), (0.99, [2])],
)
def test_single_frame_spatial_pruning(rho, kept):
    r = ManualRow(3)
    r.add("t", 0)
    for v in FRAME4:
        r.add("v", 1, v)
    r.add("t", 2)
    res = r.compress(rho, 0.0)
    keep = res.keep_mask[0].tolist()
    assert keep[0] and keep[-1]
    assert [i for i in range(4) if keep[1 + i]] == kept


def test_two_equal_frames_temporal_pruning_and_tie():
    # second frame vs first: token0 identical (cos 1), token1 opposite (-1), token2 = 2 * first (cos 1),
    # token3 orthogonal (0).
    first = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    second = torch.stack([first[0], -first[1], 2 * first[2], torch.tensor([1.0, -1.0, 3.0])])
    sims = temporal_scores(second, first)
    assert sims[0] == sims[2]  # an exact tie: power-of-two scaling is exact in the norm
    torch.testing.assert_close(sims, torch.tensor([1.0, -1.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    for rho, want in [(0.25, [1, 2, 3]), (0.5, [1, 3]), (0.75, [1])]:
        r = ManualRow(3)
        f1 = [r.add("v", 5, v) for v in first]
        f2 = [r.add("v", 30, v) for v in second]
        keep = r.compress(rho, 0.0).keep_mask[0]
        # Tie between tokens 0 and 2 (cos 1): the earlier one (0) is dropped first.
        assert [i for i in range(4) if keep[f2[i]]] == want, rho
        assert int(keep[f1].sum()) == 4 - int(4 * rho)


def test_temporal_uses_unpruned_first_frame():
    # rho=0.5: the spatial step drops first-frame tokens 1 and 0 (b, a). The temporal step must still
    # compare second[i] with the original first[i]: second = [a, -b, e1 (orthogonal to c), -d] gives
    # cos [1, -1, 0, -1] -> drop 0 and 2. (Comparing with a first frame whose pruned tokens were
    # zeroed would give [0, 0, 0, -1] -> drop 0 and 1.)
    r = ManualRow(3)
    f1 = [r.add("v", 0, v) for v in FRAME4]
    second = [FRAME4[0], [-c for c in FRAME4[1]], (1.0, 0.0, 0.0), [-c for c in FRAME4[3]]]
    f2 = [r.add("v", 25, v) for v in second]
    keep = r.compress(0.5, 0.0).keep_mask[0]
    assert keep[f1].tolist() == [False, False, True, True]
    assert keep[f2].tolist() == [False, True, False, True]


def _audio_row(scores_feature, d=4, frame_tokens=2):
    r = ManualRow(d)
    frame = [r.add("v", 0, torch.randn(d)) for _ in range(frame_tokens)]
    audio = []
    for k, f in enumerate(scores_feature):
        v = torch.zeros(d)
        v[0] = f
        v[1] = 1.0
        audio.append(r.add("a", k, v))
    return r, frame, audio


def test_audio_selection_keeps_highest_scores():
    feats = [0.3, -2.0, 1.5, 0.0, 2.5, -0.7, 0.9, 0.1, -1.0, 3.0]
    r, frame, audio = _audio_row(feats)
    sel = FeatureSelector(4, num_heads=1, hidden_dim=4)
    for rho_a in (0.0, 0.3, 0.5, 0.79, 0.9):
        res = r.compress(0.0, rho_a, selector=sel)
        n_keep = 10 - int(10 * rho_a)
        want = sorted(sorted(range(10), key=lambda i: -feats[i])[:n_keep])
        assert [i for i in range(10) if res.keep_mask[0, audio[i]]] == want, rho_a
        assert res.keep_mask[0, frame].all()
        torch.testing.assert_close(res.audio_scores[0, audio], torch.sigmoid(torch.tensor(feats)))
        assert int(res.audio_kept[0]) == n_keep and int(res.audio_total[0]) == 10


def test_audio_ties_keep_earlier():
    r, _, audio = _audio_row([0.0] * 7)
    res = r.compress(0.0, 0.5, selector=ConstantSelector(4, num_heads=1, hidden_dim=4))
    # 7 - int(3.5) = 4 kept: the first four.
    assert res.keep_mask[0, audio].tolist() == [True] * 4 + [False] * 3
    # Ties among a subset: scores 1, 0.5, 0.5, 0.5, 0 -> keep 3: index 0, then earliest two of the tie.
    r, _, audio = _audio_row([5.0, 0.0, 0.0, 0.0, -5.0])
    res = r.compress(0.0, 0.4, selector=FeatureSelector(4, num_heads=1, hidden_dim=4))
    assert res.keep_mask[0, audio].tolist() == [True, True, True, False, False]


def test_duplicate_tokens_earlier_dropped_first():
    r = ManualRow(3)
    v = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 1.0)]
    idx = [r.add("v", 0, x) for x in v]
    # The three copies of e1 share the highest similarity; k=2 drops the first two of them.
    keep = r.compress(0.34, 0.0).keep_mask[0]
    assert keep[idx].tolist() == [False, True, False, True, True, True]
    keep = r.compress(0.5, 0.0).keep_mask[0]
    assert keep[idx].tolist() == [False, True, False, True, False, True]


def test_zero_frames_no_nan_deterministic():
    r = ManualRow(4)
    f1 = [r.add("v", 0) for _ in range(6)]
    f2 = [r.add("v", 25) for _ in range(6)]
    aud = [r.add("a", k, torch.tensor([0.0, 0.0, 0.0, 0.0])) for k in range(10)]
    sel = make_selector(4, hidden_dim=8, num_heads=2)
    assert not torch.isnan(spatial_scores(torch.zeros(6, 4))).any()
    assert (spatial_scores(torch.zeros(6, 4)) == 0).all()
    assert (temporal_scores(torch.zeros(6, 4), torch.zeros(6, 4)) == 0).all()
    masks = [r.compress(0.5, 0.5, selector=sel).keep_mask for _ in range(2)]
    assert torch.equal(masks[0], masks[1])
    keep = masks[0][0]
    # All similarities are 0: ties -> the first k=3 of each frame dropped; equal audio scores -> first 5 kept.
    assert keep[f1].tolist() == [False] * 3 + [True] * 3
    assert keep[f2].tolist() == [False] * 3 + [True] * 3
    assert keep[aud].tolist() == [True] * 5 + [False] * 5
    res = r.compress(0.5, 0.5, selector=sel)
    assert not torch.isnan(res.audio_scores).any()


# ------------------------------------------------------------------------------------------------
# Edge cases of spec §2 / §9 on synthetic layouts
# ------------------------------------------------------------------------------------------------
D = 16


@pytest.fixture(scope="module")
def sel16():
    return make_selector(D)


EDGE_ROWS = {
    "odd_frames": [Text(3), Video(5, 2, 3), Text(2)],
    "trailing_audio": [Text(3), Video(3, 2, 2, audio_tokens=120), Text(2)],
    "unequal_frames_two_videos": [Text(2), Video(3, 2, 2), Text(2), Video(3, 3, 3), Text(2)],
    "one_audio_in_last_chunk": [Text(2), Video(3, 2, 2, audio_tokens=51), Text(2)],
    "video_without_audio": [Text(2), Video(4, 3, 2, audio_tokens=0), Text(2)],
    "audio_without_video": [Text(4), Audio(60), Text(3)],
    "image_and_video": [Text(2), Image(3, 4), Video(2, 2, 2), Image(2, 2), Text(2)],
    "text_only": [Text(17)],
}


@pytest.mark.parametrize("name", sorted(EDGE_ROWS))
@pytest.mark.parametrize("rho_v, rho_a", [(0.67, 0.4), (0.0, 0.5), (0.5, 0.0), (0.9, 0.9)])
def test_edge_rows_keep_counts(name, rho_v, rho_a, sel16):
    batch = make_batch([EDGE_ROWS[name]], D, seed=3)
    res = run(batch, rho_v, rho_a, sel16)
    check_batch(batch, res, rho_v, rho_a)
    keep = res.keep_mask[0]
    ids = batch.input_ids[0]
    assert keep[(ids != VID) & (ids != AUD)].all(), "text/image/special tokens must survive"
    if rho_v == 0.0:
        assert keep[ids == VID].all()
    if rho_a == 0.0:
        assert keep[ids == AUD].all()


def test_odd_frame_count_last_chunk_single_frame():
    batch = make_batch([[Video(5, 2, 3)]], D)
    chunks = spec_chunks(batch.input_ids[0], batch.position_ids[0, 0], batch.attention_mask[0])
    assert [len(f) for f, _ in chunks] == [2, 2, 1]
    assert [len(a) for _, a in chunks] == [50, 50, 25]
    res = run(batch, 0.5, 0.4, make_selector(D))
    keep = res.keep_mask[0]
    last_frame = chunks[-1][0][0]
    assert int(keep[last_frame].sum()) == 6 - 3
    assert int(keep[chunks[-1][1]].sum()) == 25 - 10


def test_last_chunk_takes_trailing_audio():
    batch = make_batch([[Text(3), Video(3, 2, 2, audio_tokens=120), Text(2)]], D)
    chunks = spec_chunks(batch.input_ids[0], batch.position_ids[0, 0], batch.attention_mask[0])
    assert [len(a) for _, a in chunks] == [50, 70]
    res = run(batch, 0.5, 0.4, make_selector(D))
    assert int(res.keep_mask[0, chunks[1][1]].sum()) == 70 - 28
    assert int(res.audio_kept[0]) == 30 + 42 and int(res.audio_total[0]) == 120


def test_unequal_frames_pair_across_boundary():
    batch = make_batch([[Text(2), Video(3, 2, 2), Text(2), Video(3, 3, 3), Text(2)]], D, seed=5)
    ids, t = batch.input_ids[0], batch.position_ids[0, 0]
    chunks = spec_chunks(ids, t, batch.attention_mask[0])
    # Frames: v1 f0 f1 | v1 f2 + v2 f0 (4 and 9 tokens) | v2 f1 f2.
    assert [[len(f) for f in fr] for fr, _ in chunks] == [[4, 4], [4, 9], [9, 9]]
    # The boundary chunk's window is [time(v1 f2), time(v2 f1)): v1's last 25 audio and v2's first 25.
    assert len(chunks[1][1]) == 50
    rho_v = 0.5
    res = run(batch, rho_v, 0.4, make_selector(D))
    keep = res.keep_mask[0]
    boundary_first, boundary_second = chunks[1][0]
    assert int(keep[boundary_first].sum()) == 2
    assert keep[boundary_second].all(), "a second frame of another size must not be pruned"
    assert int(keep[chunks[2][0][0]].sum()) == 9 - 4 and int(keep[chunks[2][0][1]].sum()) == 9 - 4
    assert int(res.video_kept[0]) == 2 + 2 + 2 + 9 + 5 + 5


def test_fewer_than_two_audio_tokens_kept_whole():
    batch = make_batch([[Video(3, 2, 2, audio_tokens=51)]], D)
    chunks = spec_chunks(batch.input_ids[0], batch.position_ids[0, 0], batch.attention_mask[0])
    assert [len(a) for _, a in chunks] == [50, 1]
    res = run(batch, 0.5, 0.9, make_selector(D))
    assert bool(res.keep_mask[0, chunks[1][1][0]])
    assert int(res.keep_mask[0, chunks[0][1]].sum()) == 5
    assert res.audio_scores[0, chunks[1][1][0]] == 0  # not scored


def test_rho_zero_is_identity(sel16):
    batch = make_batch([EDGE_ROWS["odd_frames"], EDGE_ROWS["unequal_frames_two_videos"]], D, seed=9)
    res = run(batch, 0.0, 0.0, sel16)
    assert torch.equal(res.keep_mask, batch.attention_mask.bool())
    valid = batch.attention_mask.bool()
    assert torch.equal(res.inputs_embeds, batch.inputs_embeds[valid])
    assert torch.equal(res.position_ids, batch.position_ids[:, valid])


def test_no_selector_keeps_all_audio():
    batch = make_batch([EDGE_ROWS["odd_frames"]], D)
    res = run(batch, 0.5, 0.5, None)
    assert res.keep_mask[0][batch.input_ids[0] == AUD].all()
    assert res.audio_scores is None
    check_batch(batch, res, 0.5, 0.5, scored=False)


def test_audio_only_and_text_only_rows_identity(sel16):
    batch = make_batch([EDGE_ROWS["audio_without_video"], EDGE_ROWS["text_only"]], D)
    res = run(batch, 0.7, 0.7, sel16)
    assert torch.equal(res.keep_mask, batch.attention_mask.bool())
    assert res.audio_kept.tolist() == [60, 0] and res.video_total.tolist() == [0, 0]


def test_video_without_audio():
    batch = make_batch([[Text(2), Video(4, 3, 2, audio_tokens=0), Text(2)]], D)
    assert int((batch.input_ids == AUD).sum()) == 0
    res = run(batch, 0.5, 0.5, make_selector(D))
    assert int(res.video_kept[0]) == 4 * 3
    assert not res.audio_scores.any()


def test_images_untouched(sel16):
    batch = make_batch([EDGE_ROWS["image_and_video"]], D)
    res = run(batch, 0.9, 0.9, sel16)
    img = batch.input_ids[0] == IMAGE_TOKEN_ID
    assert int(img.sum()) == 16 and res.keep_mask[0][img].all()


# ------------------------------------------------------------------------------------------------
# Ragged batches, retention at the presets
# ------------------------------------------------------------------------------------------------
def test_ragged_batch_equals_rows_alone(sel16):
    rows = [clip_row(4, 2, 3, 3, 4), EDGE_ROWS["unequal_frames_two_videos"], EDGE_ROWS["text_only"],
            [Text(2), Video(3, 2, 2, audio_tokens=120)]]
    batch = make_batch(rows, D, seed=11)
    res = run(batch, 0.67, 0.4, sel16)
    check_batch(batch, res, 0.67, 0.4)
    lens = batch.attention_mask.sum(1).tolist()
    cu = res.cu_seqlens.tolist()
    for b, n in enumerate(lens):
        alone = compress(
            batch.inputs_embeds[b : b + 1, :n], batch.input_ids[b : b + 1, :n], batch.position_ids[:, b : b + 1, :n],
            labels=batch.labels[b : b + 1, :n], video_token_id=VID, audio_token_id=AUD,
            rho_video=0.67, rho_audio=0.4, selector=sel16, backend="reference",
        )
        assert torch.equal(alone.keep_mask[0], res.keep_mask[b, :n])
        assert not res.keep_mask[b, n:].any()
        sl = slice(cu[b], cu[b + 1])
        torch.testing.assert_close(res.inputs_embeds[sl], alone.inputs_embeds, atol=0, rtol=0)
        assert torch.equal(res.position_ids[:, sl], alone.position_ids)
        assert torch.equal(res.labels[sl], alone.labels)
        torch.testing.assert_close(res.audio_scores[b, :n], alone.audio_scores[0], atol=1e-6, rtol=0)
        assert int(res.rope_deltas[b]) == int(alone.rope_deltas[0])


@pytest.mark.parametrize("rho_a, rho_v, kept", [(0.4, 0.67, 1980 + 300), (0.5, 0.77, 1380 + 250)])
def test_retention_at_presets_omni7b_shape(rho_a, rho_v, kept):
    batch = make_batch([clip_row(20, 13, 23)], 32, seed=0)
    res = run(batch, rho_v, rho_a, make_selector(32))
    assert res.video_total.tolist() == [5980] and res.audio_total.tolist() == [500]
    assert int(res.video_kept[0] + res.audio_kept[0]) == kept
    assert res.retention() == kept / 6480
    assert round(100 * res.retention(), 2) == {2280: 35.19, 1630: 25.15}[kept]
    check_batch(batch, res, rho_v, rho_a)


def test_bf16_inputs_same_counts(sel16):
    batch = make_batch([clip_row(4, 2, 3)], D, dtype=torch.bfloat16)
    res = run(batch, 0.67, 0.4, sel16)
    check_batch(batch, res, 0.67, 0.4)
    assert res.inputs_embeds.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Output layouts
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ragged():
    batch = make_batch([clip_row(4, 2, 3, 2, 3), [Text(5)], clip_row(3, 2, 2, 1, 1)], D, seed=2)
    return batch


def test_packed_consistent_with_keep_mask(ragged, sel16):
    res = run(ragged, 0.5, 0.4, sel16)
    keep = res.keep_mask
    B, L = keep.shape
    flat = keep.flatten()
    assert res.output == "packed" and res.attention_mask is None
    assert torch.equal(res.inputs_embeds, ragged.inputs_embeds.flatten(0, 1)[flat])
    assert torch.equal(res.position_ids, ragged.position_ids.flatten(1, 2)[:, flat])
    assert torch.equal(res.labels, ragged.labels.flatten()[flat])
    assert res.indices.dtype == torch.int64
    assert torch.equal(res.indices, torch.nonzero(flat).flatten())
    assert res.cu_seqlens.dtype == torch.int32
    lengths = keep.sum(1)
    assert res.cu_seqlens.tolist() == [0] + torch.cumsum(lengths, 0).tolist()
    assert res.max_seqlen == int(lengths.max()) and isinstance(res.max_seqlen, int)
    for b in range(B):
        kept_pos = ragged.position_ids[:, b][:, keep[b]]
        assert int(res.rope_deltas[b]) == int(kept_pos.max()) + 1 - int(lengths[b])
    # Gaps stay: the kept time ids are the original ones.
    assert (res.position_ids[0, 1:] - res.position_ids[0, :-1] != 1).any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_outputs(ragged, sel16, side):
    packed = run(ragged, 0.5, 0.4, sel16)
    res = run(ragged, 0.5, 0.4, sel16, output=side)
    assert torch.equal(res.keep_mask, packed.keep_mask)
    B = ragged.input_ids.shape[0]
    Lp = packed.max_seqlen
    assert res.inputs_embeds.shape == (B, Lp, D)
    assert res.position_ids.shape == (3, B, Lp)
    assert res.attention_mask.shape == (B, Lp) and res.labels.shape == (B, Lp)
    cu = packed.cu_seqlens.tolist()
    for b in range(B):
        n = cu[b + 1] - cu[b]
        sl = slice(0, n) if side == "right" else slice(Lp - n, Lp)
        pad = slice(n, Lp) if side == "right" else slice(0, Lp - n)
        assert torch.equal(res.inputs_embeds[b, sl], packed.inputs_embeds[cu[b] : cu[b + 1]])
        assert torch.equal(res.position_ids[:, b, sl], packed.position_ids[:, cu[b] : cu[b + 1]])
        assert torch.equal(res.labels[b, sl], packed.labels[cu[b] : cu[b + 1]])
        assert res.attention_mask[b, sl].eq(1).all() and res.attention_mask[b, pad].eq(0).all()
        assert res.labels[b, pad].eq(-100).all()
        assert res.inputs_embeds[b, pad].eq(0).all()
    assert torch.equal(res.rope_deltas, packed.rope_deltas)
    assert torch.equal(res.indices, packed.indices) and torch.equal(res.cu_seqlens, packed.cu_seqlens)


def test_stats(ragged, sel16):
    res = run(ragged, 0.5, 0.4, sel16)
    s = res.stats()
    assert s["video_total"] == [4 * 6, 0, 3 * 4]
    assert s["audio_total"] == [100, 0, 75]
    assert s["video_kept"] == [4 * 3, 0, 3 * 2]
    # Row 0: 2 chunks of 50 -> 30 each. Row 2: chunk of 50 -> 30, last chunk 25 -> 15.
    assert s["audio_kept"] == [60, 0, 45]
    assert res.retention() == (12 + 6 + 60 + 45) / (24 + 12 + 175)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    return make_batch([clip_row(2, 2, 2, 2, 2)], 8)


def _call(batch, **over):
    kw = dict(batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, backend="reference")
    kw.update(over)
    return compress(**kw)


@pytest.mark.parametrize("name", ["rho_video", "rho_audio"])
@pytest.mark.parametrize("value, exc", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (1.5, ValueError), ("0.5", TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_invalid_ratios(small, name, value, exc):
    with pytest.raises(exc, match=name):
        _call(small, **{name: value})


def test_valid_ratio_types(small):
    import numpy as np

    _call(small, rho_video=0, rho_audio=np.float64(0.25))
    _call(small, rho_video=0.999999, rho_audio=0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings(small, bad):
    x = small.inputs_embeds.clone()
    x[0, 7, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        _call(small, inputs_embeds=x)


def test_malformed_inputs(small):
    x, ids, pos = small.inputs_embeds, small.input_ids, small.position_ids
    cases = [
        (dict(inputs_embeds=x[0]), ValueError, "inputs_embeds"),
        (dict(inputs_embeds=x.to(torch.int64)), TypeError, "inputs_embeds"),
        (dict(inputs_embeds=x.numpy()), TypeError, "inputs_embeds"),
        (dict(input_ids=ids[:, :-1]), ValueError, "input_ids"),
        (dict(input_ids=ids.float()), TypeError, "input_ids"),
        (dict(position_ids=pos[0]), ValueError, "position_ids"),
        (dict(position_ids=pos[:2]), ValueError, "position_ids"),
        (dict(position_ids=pos.float()), TypeError, "position_ids"),
        (dict(attention_mask=small.attention_mask[:, 1:]), ValueError, "attention_mask"),
        (dict(attention_mask=small.attention_mask.float()), TypeError, "attention_mask"),
        (dict(labels=small.labels[:, 1:]), ValueError, "labels"),
        (dict(output="middle"), ValueError, "output"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
        (dict(video_token_id=1.5), TypeError, "video_token_id"),
        (dict(audio_token_id=True), TypeError, "audio_token_id"),
        (dict(selector=make_selector(16)), ValueError, "d_model"),
        (dict(selector=torch.nn.Linear(8, 1)), TypeError, "selector"),
    ]
    for over, exc, word in cases:
        with pytest.raises(exc, match=word):
            _call(small, **over)


def test_device_mismatch_error(small):
    if not torch.cuda.is_available():
        meta_ids = small.input_ids.to("meta")
        with pytest.raises(ValueError, match="input_ids"):
            _call(small, input_ids=meta_ids)
    else:  # pragma: no cover - GPU machines
        with pytest.raises(ValueError, match="input_ids"):
            _call(small, input_ids=small.input_ids.cuda())


# ------------------------------------------------------------------------------------------------
# Straight-through estimator
# ------------------------------------------------------------------------------------------------
def test_ste_gradcheck_float64():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    s = torch.rand(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: StraightThroughKeep.apply(t, s), (x,))
    assert torch.autograd.gradgradcheck(lambda t: StraightThroughKeep.apply(t, s), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ste_forward_exact_and_score_grad(dtype):
    x = torch.randn(6, 4).to(dtype).requires_grad_()
    s = torch.rand(6, requires_grad=True)
    y = straight_through_keep(x, s)
    assert y.dtype == dtype and torch.equal(y, x)
    g = torch.randn(6, 4).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, g)
    want = (x.detach().double() * g.double()).sum(-1).float()
    torch.testing.assert_close(s.grad, want, atol=1e-3, rtol=1e-3)


def test_ste_shape_errors():
    with pytest.raises(ValueError, match="straight_through_keep"):
        straight_through_keep(torch.randn(3, 2), torch.randn(2))
    with pytest.raises(ValueError, match="straight_through_keep"):
        straight_through_keep(torch.randn(3), torch.randn(3))


def test_gradient_flows_through_compress():
    batch = make_batch([clip_row(4, 2, 3, 2, 2), clip_row(3, 2, 2, 1, 1)], D, seed=4)
    sel = make_selector(D, seed=1)
    res = run(batch, 0.5, 0.4, sel)
    res.audio_scores.retain_grad()
    # Forward value of the packed embeddings is bitwise the input rows.
    assert torch.equal(res.inputs_embeds.detach(), batch.inputs_embeds.flatten(0, 1)[res.keep_mask.flatten()])
    G = torch.randn_like(res.inputs_embeds)
    (res.inputs_embeds * G).sum().backward()
    grads = {n: p.grad for n, p in sel.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert grads["score_head.2.bias"].abs() > 0
    # dL/ds_j = <x_j, dL/dy_j> for kept scored audio; dropped audio gets no gradient.
    flat_keep = res.keep_mask.flatten()
    scored = (res.audio_scores.detach() > 0).flatten()
    gs = res.audio_scores.grad.flatten()
    x = batch.inputs_embeds.flatten(0, 1)
    row_of = torch.full((flat_keep.numel(),), -1, dtype=torch.long)
    row_of[res.indices] = torch.arange(res.indices.numel())
    kept_scored = torch.nonzero(flat_keep & scored).flatten()
    assert kept_scored.numel() > 0
    for j in kept_scored.tolist():
        want = torch.dot(x[j], G[row_of[j]])
        torch.testing.assert_close(gs[j], want, atol=1e-5, rtol=1e-5)
    dropped = torch.nonzero(~flat_keep & scored).flatten()
    assert dropped.numel() > 0 and gs[dropped].eq(0).all()


def test_selector_not_mutated_and_deterministic(sel16):
    batch = make_batch([clip_row(4, 2, 3)], D, seed=8)
    before = {k: v.clone() for k, v in sel16.state_dict().items()}
    a = run(batch, 0.67, 0.4, sel16)
    b = run(batch, 0.67, 0.4, sel16)
    assert torch.equal(a.keep_mask, b.keep_mask)
    assert all(torch.equal(v, sel16.state_dict()[k]) for k, v in before.items())


def test_standalone_audio_after_a_video_joins_the_last_chunk():
    """Spec §2.3 read literally: the last chunk's window ends at the row's max time id + 1, so a
    stand-alone audio clip *after* a video is scored with the video's last chunk, while one *before*
    the first frame is in no chunk and stays whole. (Pinned so that a change is deliberate.)"""
    sel = make_selector(8, hidden_dim=8, num_heads=2)
    after = make_batch([[Video(2, 2, 2), Text(1), Audio(60)]], 8)
    res = run(after, 0.5, 0.5, sel)
    assert res.audio_kept.tolist() == [110 - 55]
    before = make_batch([[Audio(60), Text(1), Video(2, 2, 2)]], 8)
    res = run(before, 0.5, 0.5, sel)
    assert res.audio_kept.tolist() == [60 + 25]


# ------------------------------------------------------------------------------------------------
# Property: random layouts keep what the formulas say
# ------------------------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_items = st.one_of(
    st.builds(Text, st.integers(1, 4)),
    st.builds(Video, st.integers(1, 5), st.integers(1, 3), st.integers(1, 3),
              st.one_of(st.none(), st.integers(0, 130))),
    st.builds(Audio, st.integers(1, 60)),
    st.builds(Image, st.integers(1, 2), st.integers(1, 2)),
)
_ratio = st.sampled_from([0.0, 0.1, 0.3, 0.4, 0.5, 0.67, 0.7, 0.77, 0.9, 0.99])


@settings(max_examples=15)
@given(rows=st.lists(st.lists(_items, min_size=1, max_size=4), min_size=1, max_size=3),
       rho_v=_ratio, rho_a=_ratio, seed=st.integers(0, 3))
def test_random_layouts_keep_counts(rows, rho_v, rho_a, seed):
    batch = make_batch(rows, 8, seed=seed)
    sel = make_selector(8, seed=seed, hidden_dim=8, num_heads=2)
    res = run(batch, rho_v, rho_a, sel)
    check_batch(batch, res, rho_v, rho_a)
    assert torch.equal(res.inputs_embeds, batch.inputs_embeds.flatten(0, 1)[res.keep_mask.flatten()])
