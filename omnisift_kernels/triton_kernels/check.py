"""Device-side check of a caller's ``grid=`` against the plan, for CUDA calls that must not sync.

``_grid_check_kernel``: one program compares the plan's ten sizes (int64, on the device) with the
sizes the host derived from ``grid`` (passed as scalars, so the launch captures into a CUDA graph and
never copies from the host) and folds in the plan's layout violation counts; it writes one bool,
True when everything agrees. :func:`assert_grid_matches` turns it into ``torch._assert_async``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_SIZES = 10  # fields of omnisift_kernels.plan.PlanSizes
NUM_VIOLATIONS = 2  # entries of omnisift_kernels._validation.layout_violations


@triton.jit(do_not_specialize=["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"])
def _grid_check_kernel(sizes_ptr, violations_ptr, ok_ptr, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9,
                       BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    got = tl.load(sizes_ptr + i, mask=i < 10, other=0)
    want = tl.where(i == 0, e0, tl.where(i == 1, e1, tl.where(i == 2, e2, tl.where(i == 3, e3, tl.where(
        i == 4, e4, tl.where(i == 5, e5, tl.where(i == 6, e6, tl.where(i == 7, e7, tl.where(
            i == 8, e8, e9)))))))))
    bad = tl.sum(((got != want) & (i < 10)).to(tl.int32), axis=0)
    viol = tl.load(violations_ptr + i, mask=i < 2, other=0)
    bad += tl.sum((viol != 0).to(tl.int32), axis=0)
    tl.store(ok_ptr, bad == 0)


def grid_matches(plan_sizes: torch.Tensor, violations: torch.Tensor, expected: list[int]) -> torch.Tensor:
    """Bool 0-dim tensor on the device: ``plan_sizes == expected`` and no layout violation.

    Args:
        plan_sizes: int64 ``[10]`` (``DevicePlan.sizes``).
        violations: int64 ``[2]`` (``layout_violations``).
        expected: the ten sizes derived from ``grid`` on the host.
    """
    if len(expected) != NUM_SIZES or plan_sizes.numel() != NUM_SIZES or violations.numel() != NUM_VIOLATIONS:
        raise ValueError(f"grid_matches: expects {NUM_SIZES} sizes and {NUM_VIOLATIONS} violation counts, got "
                         f"{len(expected)}, {plan_sizes.numel()} and {violations.numel()}")
    ok = torch.empty((), dtype=torch.bool, device=plan_sizes.device)
    _grid_check_kernel[(1,)](plan_sizes.contiguous(), violations.contiguous(), ok, *[int(v) for v in expected],
                             BLOCK=16, num_warps=1)
    return ok


def assert_grid_matches(plan_sizes: torch.Tensor, violations: torch.Tensor, expected: list[int], msg: str) -> None:
    """``torch._assert_async`` of :func:`grid_matches` (no host synchronisation)."""
    torch._assert_async(grid_matches(plan_sizes, violations, expected), msg)
