"""segmented_topk_mask: Triton (interpreter) and torch paths vs a python-sorted reference."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnisift_kernels.ops import segmented_topk_mask
from omnisift_kernels.ops.topk import segmented_topk_mask_torch
from omnisift_kernels.testing import nan_poisoned
from omnisift_kernels.reference.topk import segmented_topk_mask as reference_topk_mask
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    from omnisift_kernels.triton_kernels import segmented_topk_mask_triton


def _layout(sizes, ks):
    off = torch.tensor([0] + sizes).cumsum(0)
    return off, torch.tensor(ks, dtype=torch.int64)


def _check(scores, off, k, path=None):
    expected = reference_topk_mask(scores, off, k)
    got = segmented_topk_mask(scores, off, k)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    return got


def test_ragged_segments(path, seed):
    sizes = [0, 1, 5, 17, 64, 300, 3, 0, 33, 1, 2]
    ks = [0, 1, 2, 16, 20, 123, 5, 3, 0, 0, 1]  # 0, >= size, size-1, ...
    off, k = _layout(sizes, ks)
    scores = torch.randn(sum(sizes))
    _check(scores, off, k)


def test_exact_ties_by_position(path):
    # duplicated scores: the earlier position wins every tie
    scores = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0, 0.0, -0.0, 0.0, -0.0, 5.0, 5.0, 5.0, 5.0])
    off, k = _layout([5, 4, 4], [2, 3, 2])
    got = _check(scores, off, k)
    assert got.tolist() == [False, True, True, False, False,
                            True, True, True, False,
                            True, True, False, False]


def test_all_equal_scores_and_extreme_k(path):
    scores = torch.full((40,), 0.25)
    off, k = _layout([10, 10, 10, 10], [3, 0, 10, 99])
    got = _check(scores, off, k)
    assert got[:10].tolist() == [True] * 3 + [False] * 7
    assert not got[10:20].any() and got[20:40].all()
    off, k = _layout([10, 10, 10, 10], [-1, 1, 9, 11])
    _check(scores, off, k)


def test_infinities(path):
    scores = torch.tensor([float("-inf"), 1.0, float("inf"), -3.0, float("inf"), 0.0])
    off, k = _layout([6], [3])
    _check(scores, off, k)


def test_nan_does_not_crash(path):
    scores = torch.tensor([0.5, float("nan"), 0.1, float("nan"), -1.0])
    off, k = _layout([5], [2])
    got = segmented_topk_mask(scores, off, k)
    assert got.shape == (5,) and int(got.sum()) == 2


def test_large_segment_torch_path():
    """Segments beyond 4096 elements on the torch path (no size limit)."""
    sizes = [5000, 3, 4097, 0]
    off, k = _layout(sizes, [1234, 1, 4000, 0])
    scores = torch.randn(sum(sizes)).round(decimals=2)  # many exact ties
    torch.testing.assert_close(segmented_topk_mask_torch(scores, off, k),
                               reference_topk_mask(scores, off, k), rtol=0, atol=0)


@pytest.mark.interpreter
def test_large_segment_triton_fallback():
    """A 4100-element segment: beyond the 4096 sort block, ranked by the pairwise fallback."""
    sizes = [4100, 7, 0, 50]
    off, k = _layout(sizes, [2050, 3, 1, 49])
    scores = torch.randn(sum(sizes)).round(decimals=2)
    expected = reference_topk_mask(scores, off, k)
    got = segmented_topk_mask_triton(scores, off, k, out=nan_poisoned(sum(sizes), torch.bool))
    assert torch.equal(got, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", [
    dict(small=16, mid=32, block=64, tile_i=16, tile_j=32),  # every branch on small segments
    dict(small=64, mid=256, block=512, tile_i=64, tile_j=128),  # GPU-like (64 / 512 / N-sized)
])
def test_all_kernel_branches(cfg, seed):
    """Forced block sizes run every branch: constant, one pairwise tile, both sorts, tiled."""
    sizes = [3, 16, 30, 64, 130, 0, 1, 7, 200]
    ks = [1, 5, 10, 63, 65, 0, 1, 7, 100]
    off, k = _layout(sizes, ks)
    scores = torch.randint(-5, 5, (sum(sizes),)).float()  # heavy ties
    scores[::7] = -0.0
    expected = reference_topk_mask(scores, off, k)
    for fill in (True, False)[: 2 if cfg["mid"] < 64 else 1]:  # big interpreted sorts are slow
        out = nan_poisoned(sum(sizes), torch.bool, fill=fill)
        assert torch.equal(segmented_topk_mask_triton(scores, off, k, out=out, **cfg), expected)


@pytest.mark.interpreter
def test_launcher_writes_every_element(seed):
    sizes = [0, 1, 5, 17, 64, 300, 3, 0, 33]
    off, k = _layout(sizes, [0, 1, 2, 16, 20, 123, 5, 3, 0])
    scores = torch.randn(sum(sizes))
    expected = reference_topk_mask(scores, off, k)
    for fill in (True, False):
        out = nan_poisoned(sum(sizes), torch.bool, fill=fill)
        assert torch.equal(segmented_topk_mask_triton(scores, off, k, out=out), expected)


@st.composite
def _layouts(draw):
    sizes = draw(st.lists(st.integers(0, 70), min_size=1, max_size=10))
    ks = [draw(st.integers(-1, s + 1)) for s in sizes]
    levels = draw(st.sampled_from([3, 50, 0]))  # 0: continuous scores
    seed = draw(st.integers(0, 2**16))
    return sizes, ks, levels, seed


@pytest.mark.interpreter
@settings(max_examples=20)
@given(_layouts())
def test_random_layouts(layout):
    sizes, ks, levels, seed = layout
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    if levels:
        scores = torch.randint(0, levels, (n,), generator=g).float() / levels
    else:
        scores = torch.randn(n, generator=g)
    off, k = _layout(sizes, ks)
    expected = reference_topk_mask(scores, off, k)
    assert torch.equal(segmented_topk_mask_triton(scores, off, k), expected)
    assert torch.equal(segmented_topk_mask_torch(scores, off, k), expected)


def test_random_layouts_torch(seed):
    rng = random.Random(seed)
    for _ in range(20):
        sizes = [rng.randrange(0, 90) for _ in range(rng.randrange(1, 12))]
        ks = [rng.randrange(-1, s + 2) for s in sizes]
        off, k = _layout(sizes, ks)
        scores = torch.randint(0, 4, (sum(sizes),)).float()
        assert torch.equal(segmented_topk_mask_torch(scores, off, k),
                           reference_topk_mask(scores, off, k))


def test_validation_errors():
    scores = torch.randn(6)
    off, k = _layout([2, 4], [1, 1])
    with pytest.raises(TypeError, match="segmented_topk_mask: scores must be float32, got torch.float64"):
        segmented_topk_mask(scores.double(), off, k)
    with pytest.raises(ValueError, match="segmented_topk_mask: scores must be 1-D"):
        segmented_topk_mask(scores[None], off, k)
    with pytest.raises(TypeError, match="segmented_topk_mask: k must be int64, got torch.int32"):
        segmented_topk_mask(scores, off, k.int())
    with pytest.raises(ValueError, match=r"seg_offsets must have length S\+1 = 3 \(S = len\(k\)\), got 2"):
        segmented_topk_mask(scores, off[:2], k)
    with pytest.raises(TypeError, match="seg_offsets must be int64"):
        segmented_topk_mask(scores, off.float(), k)
    with pytest.raises(ValueError, match="k must be on cpu"):
        segmented_topk_mask(scores, off, k.to("meta"))


def test_opcheck_and_compile():
    scores = torch.randn(20).round(decimals=1)
    off, k = _layout([5, 0, 15], [2, 1, 7])
    torch.library.opcheck(torch.ops.omnisift.segmented_topk_mask.default, (scores, off, k))

    @torch.compile(fullgraph=True)
    def f(scores, off, k):
        return segmented_topk_mask(scores, off, k)

    assert torch.equal(f(scores, off, k), reference_topk_mask(scores, off, k))


@pytest.mark.interpreter
def test_gpu_default_config_under_interpreter(monkeypatch):
    import omnisift_kernels.triton_kernels.topk as ts

    monkeypatch.setattr(ts, "interpreting", lambda: False)
    sizes = [50, 0, 70, 1, 5]  # N = 126: small = 64, mid = block = 128
    off, k = _layout(sizes, [30, 1, 20, 0, 4])
    scores = torch.randint(0, 6, (sum(sizes),)).float()
    assert torch.equal(segmented_topk_mask_triton(scores, off, k), reference_topk_mask(scores, off, k))


@pytest.mark.skipif(not torch._C._dispatch_has_kernel("omnisift::segmented_topk_mask_cpu"),
                    reason="needs the extension")
@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 70), min_size=0, max_size=10), levels=st.sampled_from([0, 2, 5]),
       seed=st.integers(0, 1000), data=st.data())
def test_cpu_kernel_equals_torch_path_and_reference(sizes, levels, seed, data):
    """The C++ CPU kernel (what the op runs on CPU tensors) and the torch path: equal to the reference,
    with ties (few score levels), -0.0/+0.0, infinities and k outside [0, size]; with NaN, equal to a
    Python sort that ranks NaN first (the order ``ops.topk`` documents; the reference takes no NaN)."""
    ks = [data.draw(st.integers(-2, s + 2)) for s in sizes]
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    scores = (torch.randint(0, levels, (n,), generator=g).float() / levels) if levels else torch.randn(n, generator=g)
    if n:
        scores[torch.randint(0, n, (max(n // 10, 1),), generator=g)] = -0.0
        scores[torch.randint(0, n, (1,), generator=g)] = float("inf")
    off, k = _layout(sizes, ks)
    expected = reference_topk_mask(scores, off, k)
    assert torch.equal(torch.ops.omnisift.segmented_topk_mask_cpu(scores, off, k), expected)
    assert torch.equal(segmented_topk_mask_torch(scores, off, k), expected)
    if n:
        scores[torch.randint(0, n, (max(n // 8, 1),), generator=g)] = float("nan")
        expected = _nan_first_topk(scores, off, k)
        assert torch.equal(torch.ops.omnisift.segmented_topk_mask_cpu(scores, off, k), expected)
        assert torch.equal(segmented_topk_mask_torch(scores, off, k), expected)


def _nan_first_topk(scores, off, k):
    """A Python sort per segment by (NaN first, score descending, position ascending); -0.0 == 0.0."""
    vals = scores.tolist()
    offs, ks = off.tolist(), k.tolist()
    mask = [False] * len(vals)
    for s in range(len(offs) - 1):
        order = sorted(range(offs[s], offs[s + 1]),
                       key=lambda i: (0, 0.0, i) if math.isnan(vals[i]) else (1, -vals[i], i))
        for r, i in enumerate(order):
            mask[i] = r < ks[s]
    return torch.tensor(mask, dtype=torch.bool)
