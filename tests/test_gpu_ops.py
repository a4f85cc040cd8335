"""GPU: the public ops on CUDA (Triton kernels compiled for the device, the extension's CUDA kernels)
against the fp64 reference (``omnisift_kernels.testing``) and plain PyTorch on the CPU.

Marked ``gpu``: skipped without CUDA (``make test-gpu`` runs them on a GPU, without the interpreter).
"""

from __future__ import annotations

import random

import pytest
import torch

from omnisift_kernels import _ext
from omnisift_kernels.ops import (
    frame_pair_similarity,
    frame_saliency,
    gather_ste,
    segmented_topk_mask,
    video_scores,
)
from omnisift_kernels.ops import varlen as VL
from omnisift_kernels.ops.video import video_scores_torch
from omnisift_kernels.testing import assert_close_scores, random_layout
from omnisift_kernels.reference.topk import segmented_topk_mask as reference_topk_mask
from omnisift_kernels.reference.video import frame_pair_similarity as reference_pair_similarity
from omnisift_kernels.reference.video import frame_saliency as reference_frame_saliency
from omnisift_kernels.reference.video import video_scores as reference_video_scores
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 5, 17, 64, 3, 0, 33, 1, 0, 299, 299, 144]


def _layout(B, L, seed):
    tok, off = random_layout(B, L, SIZES, random.Random(seed))
    pair = torch.full_like(tok, -1)
    pair[off[4]:off[4] + 3] = tok[off[3]:off[3] + 3]           # fewer than the partner frame
    pair[off[11]:off[12]] = tok[off[10]:off[11]]               # a full 299-token temporal frame
    return tok, off, pair


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fp64", "compensated"])
@pytest.mark.parametrize("D", [40, 3584])
def test_video_scores_match_reference(cuda_device, monkeypatch, dtype, mode, D):
    if not TRITON_AVAILABLE:
        pytest.skip("needs Triton")
    monkeypatch.setenv("OMNISIFT_VIDEO_ACCUMULATION", mode)
    B, L = 2, 900
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(B, L, D, generator=g) + 0.3).to(dtype)
    tok, off, pair = _layout(B, L, 1)
    xc, tc, oc, pc = (t.to(cuda_device) for t in (x, tok, off, pair))
    out = video_scores(xc, tc, oc, pc)
    assert out.device == cuda_device and out.dtype == torch.float32
    ref = reference_video_scores(x, tok, off, pair)
    assert_close_scores(out.cpu(), ref, dtype)
    assert_close_scores(out.cpu(), video_scores_torch(x, tok, off, pair), dtype)  # the CPU path
    assert_close_scores(frame_saliency(xc, tc, oc).cpu(), reference_frame_saliency(x, tok, off), dtype)
    first = torch.randint(0, B * L, (77,), generator=g)
    second = torch.randint(0, B * L, (77,), generator=g)
    got = frame_pair_similarity(xc, first.to(cuda_device), second.to(cuda_device)).cpu()
    assert_close_scores(got, reference_pair_similarity(x, first, second), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_accumulation_modes_agree(cuda_device, dtype):
    """Compensated fp32 and fp64 give the same fp32 cosines up to a rare last-bit rounding."""
    from omnisift_kernels.triton_kernels import video as V

    B, L, D = 1, 3000, 3584
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(D, generator=g) + 0.1 * torch.randn(B, L, D, generator=g)).to(dtype).to(cuda_device)
    tok, off, pair = (t.to(cuda_device) for t in _layout(B, L, 2))
    a = V.video_scores_triton(x, tok, off, pair, accumulation="fp64")
    b = V.video_scores_triton(x, tok, off, pair, accumulation="compensated")
    diff = (a.double() - b.double()).abs()
    assert float(diff.max()) <= 2.0**-23, float(diff.max())
    assert int((diff > 0).sum()) <= max(1, a.numel() // 1000)


@pytest.mark.parametrize("sizes", [[50] * 10 + [3, 1, 0], [299] * 20, [5000, 7, 4100], [1] * 300])
def test_segmented_topk_mask_exact(cuda_device, sizes):
    g = torch.Generator().manual_seed(3)
    n = sum(sizes)
    scores = torch.randint(0, 40, (n,), generator=g).float() / 8  # many exact ties
    scores[::7] = -0.0
    off = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    k = torch.tensor([s - int(s * 0.67) for s in sizes])
    got = segmented_topk_mask(scores.to(cuda_device), off.to(cuda_device), k.to(cuda_device))
    assert torch.equal(got.cpu(), reference_topk_mask(scores, off, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_ste_forward_bitwise_backward_exact(cuda_device, dtype):
    B, L, D = 3, 200, 3584
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, L, D, generator=g).to(dtype)
    idx = torch.randperm(B * L, generator=g)[:333].sort().values
    scores = torch.rand(B, L, generator=g)
    xc = x.to(cuda_device).requires_grad_(True)
    sc = scores.to(cuda_device).requires_grad_(True)
    out = gather_ste(xc, idx.to(cuda_device), sc)
    assert torch.equal(out.detach().cpu(), x.flatten(0, 1)[idx])
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad.to(cuda_device))
    want_x = torch.zeros(B * L, D, dtype=dtype)
    want_x[idx] = grad
    assert torch.equal(xc.grad.cpu(), want_x.view(B, L, D))
    want_s = torch.zeros(B * L, dtype=torch.float64)
    want_s[idx] = (x.flatten(0, 1)[idx].double() * grad.double()).sum(-1)
    torch.testing.assert_close(sc.grad.cpu().double().flatten(), want_s, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# The extension's CUDA kernels: exact against plain PyTorch on the CPU.

needs_cuda_ext = pytest.mark.skipif(not _ext.ext_has_kernel("varlen_compact", "CUDA"),
                                    reason="extension built without CUDA kernels")


def _case(B, L, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g).to(dtype)
    keep = torch.rand(B, L, generator=g) > 0.6
    if B > 1:
        keep[1] = False  # an empty row
    pos = torch.randint(0, 10**6, (3, B, L), generator=g)
    labels = torch.randint(-100, 1000, (B, L), generator=g)
    return x, keep, pos, labels


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 257, 3584), (2, 33, 7), (1, 1, 1), (4, 1000, 2051)])
def test_varlen_cuda_exact(cuda_device, dtype, shape):
    x, keep, pos, labels = _case(*shape, dtype, 5)
    flat = keep.flatten()
    dev = lambda t: t.to(cuda_device)  # noqa: E731
    for total in (None, int(flat.sum())):
        r = VL.varlen_compact(dev(x), dev(keep), position_ids=dev(pos), labels=dev(labels), total=total)
        assert torch.equal(r.packed.cpu(), x.flatten(0, 1)[flat])
        assert torch.equal(r.indices.cpu(), flat.nonzero().flatten())
        assert torch.equal(r.cu_seqlens.cpu(), torch.nn.functional.pad(keep.sum(1).cumsum(0), (1, 0)).int())
        assert torch.equal(r.position_ids.cpu(), pos.flatten(-2)[:, flat])
        assert torch.equal(r.labels.cpu(), labels.flatten()[flat])
        if total is None:
            assert r.max_seqlen == int(keep.sum(1).max())
    back = VL.varlen_scatter(r.packed, r.indices, x.shape[0], x.shape[1])
    assert torch.equal(back.cpu(), torch.where(keep[..., None], x, torch.zeros((), dtype=dtype)))
    idx = torch.randint(0, x.shape[0] * x.shape[1], (50,))
    got = VL.varlen_gather(dev(x.flatten(0, 1)), dev(idx))
    assert torch.equal(got.cpu(), x.flatten(0, 1)[idx])
    for side in ("right", "left"):
        p = VL.varlen_pad(dev(x), dev(keep), side=side, labels=dev(labels))
        assert torch.equal(p.padded.flatten(0, 1)[p.pad_indices].cpu(), x.flatten(0, 1)[flat])
    torch.cuda.synchronize(cuda_device)


@needs_cuda_ext
def test_varlen_cuda_noncontiguous_and_unaligned(cuda_device):
    x, keep, _, _ = _case(2, 64, 2 * 1030 + 1, torch.bfloat16, 6)
    xs = x.to(cuda_device)[..., 1::2]  # stride 2 along D, an odd offset
    r = VL.varlen_compact(xs, keep.to(cuda_device))
    assert torch.equal(r.packed.cpu(), x[..., 1::2].flatten(0, 1)[keep.flatten()])
