"""testing.near_tie_differences: how the bench compares keep masks that may differ at near ties."""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels import VisionGuidedAudioSelector, compress
from omnisift_kernels.reference import plan_row
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.testing import near_tie_differences, tolerance

D = 32


def _setup(dtype=torch.bfloat16):
    torch.manual_seed(0)
    sel = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).to(dtype).eval()
    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 2)], D, seed=1, dtype=dtype)
    kw = dict(batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, selector=sel)
    ref = compress(**kw, backend="reference")
    check = lambda mask: near_tie_differences(  # noqa: E731
        mask, ref.keep_mask, ref.audio_scores, batch.inputs_embeds, batch.input_ids, batch.position_ids,
        batch.attention_mask,
        video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id, selector_dtype=dtype)
    return batch, ref, check


def _a_chunk(batch, ref):
    """(row, audio positions) of a scored chunk with a kept and a dropped audio token."""
    for b in range(batch.input_ids.shape[0]):
        plan = plan_row(batch.input_ids[b], batch.position_ids[0, b], batch.attention_mask[b].bool(),
                        batch.video_token_id, batch.audio_token_id)
        for ch in plan.chunks:
            kept = ref.keep_mask[b, ch.audio]
            if ch.audio.numel() >= 2 and kept.any() and not kept.all():
                return b, ch.audio
    raise AssertionError("no chunk with kept and dropped audio")


def test_equal_masks_have_no_difference():
    batch, ref, check = _setup()
    assert check(ref.keep_mask.clone()) == 0


def test_a_clear_ranking_error_is_a_mismatch():
    """Keeping the worst-scored token of a chunk instead of its best is not a near tie."""
    batch, ref, check = _setup()
    b, pos = _a_chunk(batch, ref)
    s = ref.audio_scores.detach()[b, pos]
    kept = ref.keep_mask[b, pos]
    best_kept = pos[kept][s[kept].argmax()]
    worst_dropped = pos[~kept][s[~kept].argmin()]
    atol, rtol = tolerance(torch.bfloat16, "score")
    assert float(s[kept].max() - s[~kept].min()) > atol + rtol  # the data make it a clear error
    wrong = ref.keep_mask.clone()
    wrong[b, best_kept], wrong[b, worst_dropped] = False, True
    with pytest.raises(AssertionError, match="tolerance"):
        check(wrong)


def test_video_swaps_within_the_similarity_tolerance_are_near_ties():
    """Swapping the last dropped and the first kept video token of a frame: accepted only when the
    reference's cosines of the two are within the similarity tolerance."""
    from omnisift_kernels.reference import spatial_scores

    batch, ref, check = _setup(torch.float32)
    b = 0
    plan = plan_row(batch.input_ids[b], batch.position_ids[0, b], batch.attention_mask[b].bool(),
                    batch.video_token_id, batch.audio_token_id)
    pos = plan.chunks[0].frames[0]
    s = spatial_scores(batch.inputs_embeds[b, pos])
    dropped = ~ref.keep_mask[b, pos]
    last_dropped = pos[dropped][s[dropped].argmin()]
    first_kept = pos[~dropped][s[~dropped].argmax()]
    gap = float(s[dropped].min() - s[~dropped].max())
    atol, rtol = tolerance(torch.float32, "similarity")
    swapped = ref.keep_mask.clone()
    swapped[b, last_dropped], swapped[b, first_kept] = True, False
    assert gap > atol + rtol  # random embeddings: a clear gap, so the swap is a ranking error
    with pytest.raises(AssertionError, match="tolerance"):
        check(swapped)


def test_scores_within_tolerance_of_each_other_may_swap():
    """A swap between two tokens the reference scores within the tolerance is a near tie."""
    batch, ref, check = _setup()
    b, pos = _a_chunk(batch, ref)
    kept = ref.keep_mask[b, pos]
    k_tok, d_tok = pos[kept][0], pos[~kept][0]
    scores = ref.audio_scores.detach().clone()
    scores[b, d_tok] = scores[b, k_tok] - 1e-3   # a near tie
    scores[b, pos[kept]] = torch.maximum(scores[b, pos[kept]], scores[b, k_tok])
    ref_keep = ref.keep_mask
    swapped = ref_keep.clone()
    swapped[b, k_tok], swapped[b, d_tok] = False, True
    n = near_tie_differences(
        swapped, ref_keep, scores, batch.inputs_embeds, batch.input_ids, batch.position_ids, batch.attention_mask,
        video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id, selector_dtype=torch.bfloat16)
    assert n == 2


def test_other_differences_are_mismatches():
    batch, ref, check = _setup()
    b, pos = _a_chunk(batch, ref)
    fewer = ref.keep_mask.clone()
    fewer[b, pos[ref.keep_mask[b, pos]][0]] = False
    with pytest.raises(AssertionError, match="different number"):
        check(fewer)
    video = (batch.input_ids == batch.video_token_id)
    vb, vpos = (int(v) for v in video.nonzero()[0])
    flipped = ref.keep_mask.clone()
    flipped[vb, vpos] = ~flipped[vb, vpos]
    with pytest.raises(AssertionError, match="different number"):
        check(flipped)  # one more or one fewer video token dropped in that frame
    text = (batch.input_ids != batch.video_token_id) & (batch.input_ids != batch.audio_token_id)
    tb, tpos = (int(v) for v in text.nonzero()[0])
    other = ref.keep_mask.clone()
    other[tb, tpos] = ~other[tb, tpos]
    with pytest.raises(AssertionError, match="outside any frame"):
        check(other)
    with pytest.raises(AssertionError, match="shape"):
        check(ref.keep_mask[:, :-1])


def test_an_exact_video_tie_may_be_broken_either_way():
    """Two tokens at a frame's cut with equal scores: the reference drops the earlier (spec §8); an
    implementation that dropped the later one differs only by a near tie."""
    torch.manual_seed(0)
    sel = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).eval()
    batch = make_batch([clip_row(4, 2, 3)], D, seed=1)
    b = 0
    plan = plan_row(batch.input_ids[b], batch.position_ids[0, b], batch.attention_mask[b].bool(),
                    batch.video_token_id, batch.audio_token_id)
    pos = plan.chunks[0].frames[0]
    assert len(pos) == 6  # rho 0.5 drops 3
    # Row i = e0 + alpha_i * e_(i+1): cos(row, mean) depends on alpha_i alone and falls as it grows,
    # so the 0.1 and 0.2 rows are dropped, then the two 0.5 rows tie for the third drop.
    for i, alpha in enumerate([0.1, 0.2, 0.5, 0.5, 1.0, 2.0]):
        row = torch.zeros(D)
        row[0], row[i + 1] = 1.0, alpha
        batch.inputs_embeds[b, pos[i]] = row
    kw = dict(batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, selector=sel)
    ref = compress(**kw, backend="reference")
    early, late = int(pos[2]), int(pos[3])
    assert not ref.keep_mask[b, early] and ref.keep_mask[b, late]  # the tie rule
    assert torch.equal(compress(**kw, backend="cpu").keep_mask, ref.keep_mask)  # so does the fast path
    other = ref.keep_mask.clone()
    other[b, early], other[b, late] = True, False
    n = near_tie_differences(
        other, ref.keep_mask, ref.audio_scores, batch.inputs_embeds, batch.input_ids, batch.position_ids,
        batch.attention_mask, video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id,
        selector_dtype=torch.float32)
    assert n == 2
