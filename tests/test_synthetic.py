"""The synthetic Qwen2.5-Omni layout builder and the named workloads (shared/spec/workloads.md)."""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels import synthetic as S
from omnisift_kernels.synthetic import (
    WORKLOADS,
    Audio,
    Image,
    Text,
    Video,
    clip_row,
    make_batch,
    make_workload,
    row_length,
)


def media_counts(items):
    video = sum(it.seconds * it.tokens_per_frame for it in items if isinstance(it, Video))
    audio = sum(it.num_audio for it in items if isinstance(it, Video)) + sum(
        it.tokens for it in items if isinstance(it, Audio)
    )
    text = sum(it.tokens for it in items if isinstance(it, Text))
    return video, audio, text


# name -> (D, per-row video tokens, per-row audio tokens) of the workloads table.
TABLE = {
    "tiny": (64, [96, 72], [100, 75]),
    "omni3b-20s": (2048, [5980], [500]),
    "omni7b-20s": (3584, [5980], [500]),
    "omni7b-120s": (3584, [35880], [3000]),
    "omni7b-batch8": (3584, [s * 299 for s in (8, 10, 12, 14, 16, 18, 20, 20)], [s * 25 for s in (8, 10, 12, 14, 16, 18, 20, 20)]),
    "omni7b-600s": (3584, [86400], [15000]),
}


def test_workload_names():
    assert set(WORKLOADS) == set(TABLE)
    assert S.DEFAULT_WORKLOAD == "omni7b-20s"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_workload_token_counts(name):
    w = WORKLOADS[name]
    d, video, audio = TABLE[name]
    assert w.d_model == d
    counts = [media_counts(r) for r in w.rows]
    assert [c[0] for c in counts] == video
    assert [c[1] for c in counts] == audio
    for items, (_, _, text) in zip(w.rows, counts):
        assert text == 30  # ~30 text tokens per row
        n_media = sum(1 for it in items if isinstance(it, Video))
        assert row_length(list(items)) == sum(media_counts(items)) + 4 * n_media
    assert w.num_tokens == sum(row_length(list(r)) for r in w.rows)


def test_workload_sizes_as_described():
    assert row_length(list(WORKLOADS["omni7b-20s"].rows[0])) == 5980 + 500 + 30 + 4
    assert 38_000 < WORKLOADS["omni7b-120s"].num_tokens < 40_000  # "~39K tokens"
    assert WORKLOADS["omni7b-600s"].num_tokens > 100_000  # ">100K tokens"
    frames = {(it.frame_h, it.frame_w) for w in WORKLOADS.values() for r in w.rows for it in r if isinstance(it, Video)}
    assert frames == {(4, 6), (13, 23), (9, 16)}
    lengths = [row_length(list(r)) for r in WORKLOADS["omni7b-batch8"].rows]
    assert len(set(lengths)) == 7  # ragged (the two 20 s rows are equal)


def test_tiny_built():
    b = make_workload("tiny")
    w = WORKLOADS["tiny"]
    lens = [row_length(list(r)) for r in w.rows]
    assert b.inputs_embeds.shape == (2, max(lens), 64)
    assert b.attention_mask.sum(1).tolist() == lens
    assert ((b.input_ids == S.VIDEO_TOKEN_ID) & b.attention_mask.bool()).sum(1).tolist() == [96, 72]
    assert ((b.input_ids == S.AUDIO_TOKEN_ID) & b.attention_mask.bool()).sum(1).tolist() == [100, 75]
    assert b.input_ids.dtype == b.position_ids.dtype == b.labels.dtype == torch.int64
    assert b.position_ids.shape == (3, 2, max(lens))
    # Right padding: pad ids, labels -100, mask 0.
    n1 = lens[1]
    assert (b.input_ids[1, n1:] == S.PAD_TOKEN_ID).all() and (b.labels[1, n1:] == -100).all()
    assert (b.attention_mask[1, :n1] == 1).all() and (b.attention_mask[1, n1:] == 0).all()


def test_make_workload_unknown():
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("omni7b-21s")


def test_make_batch_errors():
    with pytest.raises(ValueError, match="rows"):
        make_batch([], 8)
    with pytest.raises(TypeError, match="unknown row item"):
        make_batch([[Text(2), "video"]], 8)


def test_dtype_and_device():
    b = make_batch([clip_row(2, 2, 2)], 8, dtype=torch.bfloat16)
    assert b.inputs_embeds.dtype == torch.bfloat16
    f = make_batch([clip_row(2, 2, 2)], 8)
    assert torch.equal(b.inputs_embeds, f.inputs_embeds.bfloat16())


def test_determinism_from_seed():
    rows = [clip_row(3, 2, 3, 4, 5), [Text(3), Image(2, 2), Audio(30)]]
    a = make_batch(rows, 16, seed=7)
    b = make_batch(rows, 16, seed=7)
    c = make_batch(rows, 16, seed=8)
    for f in ("inputs_embeds", "input_ids", "position_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.inputs_embeds, c.inputs_embeds)
    assert torch.equal(a.position_ids, c.position_ids)  # the layout does not depend on the seed


def _row(batch, b=0):
    n = int(batch.attention_mask[b].sum())
    return batch.input_ids[b, :n].tolist(), batch.position_ids[:, b, :n].T.tolist()


def test_video_with_audio_layout():
    seconds, fh, fw, before, after = 5, 2, 3, 4, 3
    batch = make_batch([clip_row(seconds, fh, fw, before, after)], 8)
    ids, pos = _row(batch)
    # Text: positions 0..before-1, all three rows equal.
    assert pos[:before] == [[i, i, i] for i in range(before)]
    # <|vision_bos|><|audio_bos|> share one position.
    assert ids[before : before + 2] == [S.VISION_BOS_ID, S.AUDIO_BOS_ID]
    assert pos[before] == pos[before + 1] == [before] * 3
    st = before + 1
    i = before + 2
    n_chunks = -(-seconds // 2)
    for c in range(n_chunks):
        for g in range(2 * c, min(2 * c + 2, seconds)):
            for h in range(fh):
                for w in range(fw):
                    assert ids[i] == S.VIDEO_TOKEN_ID
                    assert pos[i] == [st + 25 * g, st + h, st + w], (g, h, w)
                    i += 1
        for k in range(50 * c, min(50 * c + 50, 25 * seconds)):
            assert ids[i] == S.AUDIO_TOKEN_ID and pos[i] == [st + k] * 3, k
            i += 1
    # <|audio_eos|><|vision_eos|> at max + 1, then text continues.
    end = max(max(p) for p in pos[:i]) + 1
    assert ids[i : i + 2] == [S.AUDIO_EOS_ID, S.VISION_EOS_ID]
    assert pos[i] == pos[i + 1] == [end] * 3
    assert pos[i + 2 :] == [[end + 1 + t] * 3 for t in range(after)]
    assert len(ids) == i + 2 + after
    # Labels: the text after the last media item.
    labels = batch.labels[0, : len(ids)].tolist()
    assert labels[: i + 2] == [-100] * (i + 2)
    assert labels[i + 2 :] == ids[i + 2 :]


def test_audio_longer_than_video_layout():
    batch = make_batch([[Video(3, 2, 2, audio_tokens=120)]], 8)
    ids, pos = _row(batch)
    kinds = "".join("v" if t == S.VIDEO_TOKEN_ID else "a" if t == S.AUDIO_TOKEN_ID else "." for t in ids)
    assert kinds == ".." + "v" * 8 + "a" * 50 + "v" * 4 + "a" * 50 + "a" * 20 + ".."
    st = 1
    audio_times = [p[0] for t, p in zip(ids, pos) if t == S.AUDIO_TOKEN_ID]
    assert audio_times == [st + k for k in range(120)]


def test_video_without_audio_layout():
    batch = make_batch([[Text(2), Video(3, 2, 2, audio_tokens=0)]], 8)
    ids, pos = _row(batch)
    assert S.AUDIO_TOKEN_ID not in ids and S.AUDIO_BOS_ID not in ids and S.AUDIO_EOS_ID not in ids
    assert ids[2] == S.VISION_BOS_ID and ids[-1] == S.VISION_EOS_ID
    assert row_length([Text(2), Video(3, 2, 2, audio_tokens=0)]) == len(ids) == 2 + 12 + 2
    frame_times = sorted({p[0] for t, p in zip(ids, pos) if t == S.VIDEO_TOKEN_ID})
    assert frame_times == [3 + 25 * g for g in range(3)]
    assert pos[-1] == [3 + 50 + 1] * 3


def test_audio_and_image_layout():
    batch = make_batch([[Text(2), Audio(30), Image(2, 3), Text(1)]], 8)
    ids, pos = _row(batch)
    assert ids[2] == S.AUDIO_BOS_ID and pos[2] == [2, 2, 2]
    assert [p for t, p in zip(ids, pos) if t == S.AUDIO_TOKEN_ID] == [[3 + k] * 3 for k in range(30)]
    assert ids[33] == S.AUDIO_EOS_ID and pos[33] == [33] * 3
    assert ids[34] == S.VISION_BOS_ID and pos[34] == [34] * 3
    img = [p for t, p in zip(ids, pos) if t == S.IMAGE_TOKEN_ID]
    assert img == [[35, 35 + h, 35 + w] for h in range(2) for w in range(3)]
    assert ids[41] == S.VISION_EOS_ID and pos[41] == [38] * 3
    assert pos[42] == [39] * 3
    assert row_length([Text(2), Audio(30), Image(2, 3), Text(1)]) == len(ids)


def test_two_videos_positions_increase():
    batch = make_batch([[Video(2, 2, 2), Text(1), Video(3, 3, 3)]], 8)
    ids, pos = _row(batch)
    vt = [p[0] for t, p in zip(ids, pos) if t == S.VIDEO_TOKEN_ID]
    frames = sorted(set(vt))
    assert len(frames) == 5
    assert frames[2] > frames[1] and frames[3] - frames[2] == 25 and frames[4] - frames[3] == 25


def test_embeddings_frame_structure():
    """Frames are a shared mean plus noise: tokens of a frame are more alike than tokens of text."""
    batch = make_batch([clip_row(6, 4, 4)], 32, seed=1)
    x = batch.inputs_embeds[0]
    vid = batch.input_ids[0] == S.VIDEO_TOKEN_ID
    frame = x[vid][:16]
    mean_cos = torch.nn.functional.cosine_similarity(frame, frame.mean(0, keepdim=True)).mean()
    txt = x[:15]
    txt_cos = torch.nn.functional.cosine_similarity(txt, txt.mean(0, keepdim=True)).mean()
    assert mean_cos > txt_cos + 0.1


def test_compress_kwargs():
    b = make_batch([clip_row(2, 2, 2)], 8)
    kw = b.compress_kwargs()
    assert set(kw) == {"inputs_embeds", "input_ids", "position_ids", "attention_mask", "labels",
                       "video_token_id", "audio_token_id"}
    assert kw["video_token_id"] == S.VIDEO_TOKEN_ID and kw["audio_token_id"] == S.AUDIO_TOKEN_ID
