"""The video kernels' accumulation modes: fp64 and compensated fp32 (for GPUs with slow fp64).

Under the Triton interpreter on the CPU; the mode is forced through the launchers' ``accumulation``
argument or ``OMNISIFT_VIDEO_ACCUMULATION``. Scores are compared with the fp64 reference
(``omnisift_kernels.testing``), masks with the reference's up to the documented near ties.
"""

from __future__ import annotations

import random

import pytest
import torch

from omnisift_kernels import VisionGuidedAudioSelector, compress
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.testing import assert_close_scores, near_tie_differences, random_layout
from omnisift_kernels.reference.video import frame_pair_similarity as reference_pair_similarity
from omnisift_kernels.reference.video import frame_saliency as reference_frame_saliency
from omnisift_kernels.reference.video import video_scores as reference_video_scores
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    from omnisift_kernels.triton_kernels import accumulation as A
    from omnisift_kernels.triton_kernels import video as V

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 5, 17, 64, 3, 0, 33, 1, 0]


def _fused_layout(B, L, seed):
    """CSR frames plus a pair_index pairing part of later frames with earlier ones."""
    tok, off = random_layout(B, L, SIZES, random.Random(seed))
    pair = torch.full_like(tok, -1)
    pair[off[4]:off[4] + 3] = tok[off[3]:off[3] + 3]
    pair[off[7] + 1:off[7] + 30] = tok[off[4]:off[4] + 29]
    return tok, off, pair


def test_rule_by_capability(monkeypatch):
    monkeypatch.delenv(A.ACCUMULATION_ENV, raising=False)
    assert A.accumulation_mode(torch.device("cpu")) == "fp64"
    cuda = torch.device("cuda", 0)
    for cap, mode in [((9, 0), "fp64"), ((8, 0), "fp64"), ((10, 0), "fp64"), ((7, 0), "fp64"),
                      ((8, 6), "compensated"), ((8, 9), "compensated"), ((7, 5), "compensated"),
                      ((12, 0), "compensated"), ((10, 3), "compensated")]:
        monkeypatch.setattr(A, "_capability", lambda index, cap=cap: cap)
        assert A.accumulation_mode(cuda) == mode, cap


def test_rule_environment_override(monkeypatch):
    monkeypatch.setenv(A.ACCUMULATION_ENV, "compensated")
    assert A.accumulation_mode(torch.device("cpu")) == "compensated"
    monkeypatch.setenv(A.ACCUMULATION_ENV, "fp64")
    monkeypatch.setattr(A, "_capability", lambda index: (8, 9))
    assert A.accumulation_mode(torch.device("cuda", 0)) == "fp64"
    monkeypatch.setenv(A.ACCUMULATION_ENV, "fast")
    with pytest.raises(ValueError, match="OMNISIFT_VIDEO_ACCUMULATION"):
        A.accumulation_mode(torch.device("cpu"))


@pytest.mark.interpreter
def test_bad_accumulation_argument_names_the_op():
    x = torch.randn(1, 4, 8)
    idx = torch.arange(4)
    with pytest.raises(ValueError, match="frame_pair_similarity: accumulation"):
        V.frame_pair_similarity_triton(x, idx, idx, accumulation="fp32")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fp64", "compensated"])
def test_scores_match_reference(dtype, mode):
    B, L, D = 2, 120, 300
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(B, L, D, generator=g) + 0.7).to(dtype)  # correlated rows: cosines near 1
    tok, off, pair = _fused_layout(B, L, 3)
    assert_close_scores(V.frame_saliency_triton(x, tok, off, accumulation=mode),
                        reference_frame_saliency(x, tok, off), dtype)
    first, second = torch.randint(0, B * L, (41,), generator=g), torch.randint(0, B * L, (41,), generator=g)
    out = V.frame_pair_similarity_triton(x, first, second, accumulation=mode)
    ref = reference_pair_similarity(x, first, second)
    # pairs have no mean to sum in another order: the fp32 cosine is the reference's, bit for bit
    assert torch.equal(out, ref.float())
    assert_close_scores(V.video_scores_triton(x, tok, off, pair, accumulation=mode),
                        reference_video_scores(x, tok, off, pair), dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_compensated_equals_fp64_on_strided_input(dtype):
    """The two modes give the same fp32 cosines (both are the fp32 rounding of a value within
    ~2^-45 of the exact one), here on a non-contiguous x with cosines crowded near 1."""
    B, L, D = 2, 100, 257
    g = torch.Generator().manual_seed(5)
    base = torch.randn(D, generator=g)
    full = (base + 0.05 * torch.randn(B, L, 2 * D, generator=g)[..., :D]).to(dtype)
    x = torch.randn(B, L, 2 * D, generator=g).to(dtype)
    x[..., ::2] = full
    x = x[..., ::2]
    assert not x.is_contiguous()
    tok, off, pair = _fused_layout(B, L, 5)
    a = V.video_scores_triton(x, tok, off, pair, accumulation="fp64")
    b = V.video_scores_triton(x, tok, off, pair, accumulation="compensated")
    assert torch.equal(a, b)
    a = V.frame_saliency_triton(x, tok, off, accumulation="fp64")
    b = V.frame_saliency_triton(x, tok, off, accumulation="compensated")
    assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["fp64", "compensated"])
def test_out_of_range_indices_read_zero_rows(mode):
    """No load leaves x whatever the indices hold; such tokens read as zero rows (cosine 0)."""
    B, L, D = 2, 30, 16
    x = torch.randn(B, L, D)
    tok, off = random_layout(B, L, [5, 7, 3], random.Random(1))
    bad = tok.clone()
    bad[2], bad[9] = 10**12, -7
    offs = off.clone()
    offs[1] = -100
    pair = torch.full_like(tok, -1)
    pair[5:8] = torch.tensor([10**9, -5, tok[0]])
    for out in (V.frame_saliency_triton(x, bad, offs, accumulation=mode),
                V.video_scores_triton(x, bad, offs, pair, accumulation=mode),
                V.frame_pair_similarity_triton(x, bad, bad.flip(0), accumulation=mode)):
        assert torch.isfinite(out).all()
        assert out[2] == 0 and out[9] == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_masks_match_reference_in_compensated_mode(monkeypatch, dtype):
    monkeypatch.setenv("OMNISIFT_TRITON_ON_CPU", "1")
    monkeypatch.setenv(A.ACCUMULATION_ENV, "compensated")
    D = 32
    torch.manual_seed(0)
    sel = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).to(dtype).eval()
    batch = make_batch([clip_row(4, 3, 4), clip_row(3, 2, 3)], D, seed=11, dtype=dtype)
    kw = dict(batch.compress_kwargs(), rho_video=0.67, rho_audio=0.4, selector=sel)
    with torch.no_grad():
        ref = compress(**kw, backend="reference")
        fast = compress(**kw, backend="triton", grid=batch.rows)
    near_tie_differences(fast.keep_mask, ref.keep_mask, ref.audio_scores, batch.inputs_embeds,
                         batch.input_ids, batch.position_ids, batch.attention_mask,
                         video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id,
                         selector_dtype=dtype)
