"""The top-k kernel's segment bounds (interpreter): offsets outside [0, N] are clamped, so no load
or store leaves scores / out, and valid segments are still ranked by the spec's rule."""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels.reference.topk import segmented_topk_mask as reference_topk_mask
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    from omnisift_kernels.triton_kernels.topk import segmented_topk_mask_triton

pytestmark = [pytest.mark.interpreter, pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs Triton")]


@pytest.mark.parametrize("knobs", [{}, dict(small=16, mid=16, block=16, tile_i=16, tile_j=16),
                                   dict(small=16, mid=32, block=64)])
def test_offsets_out_of_range_are_clamped(knobs):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(100, generator=g)
    off = torch.tensor([0, 30, 60, 100])
    k = torch.tensor([10, 5, 20])
    want = reference_topk_mask(scores, off, k)
    out = segmented_topk_mask_triton(scores, off, k, **knobs)
    assert torch.equal(out, want)
    bad = torch.tensor([-50, 30, 10**9, 100])  # negative start, an end far past N, a decreasing pair
    out = segmented_topk_mask_triton(scores, bad, k, **knobs)
    # clamped: segment 0 = [0, 30), segment 1 = [30, 100), segment 2 = [100, 100)
    assert torch.equal(out, reference_topk_mask(scores, torch.tensor([0, 30, 100, 100]), k))
