"""How the video kernels accumulate their dot products and norms, and the rule that picks it.

Accumulation modes (constexpr ``COMPENSATED``; launchers' ``accumulation=`` argument):

* ``"fp64"``: fp64 register tiles. Free on GPUs with full-rate fp64 (A100, H100/H200, B200).
* ``"compensated"``: for GPUs whose fp64 runs at 1/32-1/64 of fp32 (L4, L40, A10, A40, T4, RTX),
  where fp64 tiles could make the memory-bound pass compute-bound. Each tile element keeps an fp32
  pair ``(hi, lo)``: products are split exactly with an fma (``a*b = p + fma(a, b, -p)``), sums with
  Knuth's TwoSum, errors collected in ``lo`` (Ogita-Rump-Oishi Dot2; ~10 fp32 operations per
  product instead of one fp64 fma). After the loop each lane's pairs are widened and summed in fp64
  (``BLOCK_T*BLOCK_D`` fp64 adds per program, not per element), and the cosine is formed in fp64 as
  before. The segment means are stored as fp32 ``hi + lo`` pairs (``[S, 2, D]``). The partial sums
  are then within ~2^-45 relative of the fp64 ones, so the fp32 cosines equal the fp64 mode's except
  when the exact value lies that close to an fp32 rounding boundary: masks equal the reference's up
  to the documented near ties (``testing.near_tie_differences``). Launched with
  ``enable_fp_fusion=False`` so that no add/multiply pair is contracted into an fma.

Rule (:func:`accumulation_mode`): ``OMNISIFT_VIDEO_ACCUMULATION=fp64|compensated|auto`` overrides;
under ``auto`` a CUDA device whose compute capability is in :data:`FAST_FP64_CAPABILITIES` (6.0, 7.0,
8.0, 9.0, 10.0) runs ``"fp64"``, every other CUDA device ``"compensated"``, the CPU (interpreter)
``"fp64"``. Tests force either mode through the argument.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["ACCUMULATION_ENV", "ACCUMULATION_MODES", "FAST_FP64_CAPABILITIES", "accumulation_mode",
           "compensated_mode", "launch_options"]

ACCUMULATION_MODES = ("fp64", "compensated")
ACCUMULATION_ENV = "OMNISIFT_VIDEO_ACCUMULATION"
# (major, minor) compute capabilities whose fp64 rate is half of (or close to) the fp32 rate:
# P100, V100, A100/A30, H100/H200/GH200, B200/GB200. Every other CUDA device (consumer and
# workstation cards, L4/L40/A10/A40/T4, Jetson, B300's reduced fp64) runs fp64 at 1/32-1/64.
FAST_FP64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def accumulation_mode(device: torch.device) -> str:
    """How the video kernels accumulate on ``device``: ``"fp64"`` or ``"compensated"``.

    Rule: ``OMNISIFT_VIDEO_ACCUMULATION`` (``fp64`` | ``compensated`` | ``auto``, read on every
    call) overrides; under ``auto`` (or unset) a CUDA device whose compute capability is in
    :data:`FAST_FP64_CAPABILITIES` gets ``"fp64"``, any other CUDA device ``"compensated"``, and the
    CPU (the interpreter) ``"fp64"``. The capability is a cached host query (no device sync).
    """
    env = os.environ.get(ACCUMULATION_ENV, "auto").strip().lower() or "auto"
    if env in ACCUMULATION_MODES:
        return env
    if env != "auto":
        raise ValueError(f"{ACCUMULATION_ENV} must be fp64, compensated or auto, got {env!r}")
    if device.type != "cuda":
        return "fp64"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "fp64" if _capability(index) in FAST_FP64_CAPABILITIES else "compensated"


def compensated_mode(op: str, device: torch.device, accumulation) -> bool:
    """Whether a launch on ``device`` accumulates compensated (``accumulation``: a mode or None for
    the rule); a ValueError naming ``op`` for an unknown mode."""
    mode = accumulation_mode(device) if accumulation is None else accumulation
    if mode not in ACCUMULATION_MODES:
        raise ValueError(f"{op}: accumulation must be one of {ACCUMULATION_MODES} or None, got {mode!r}")
    return mode == "compensated"


def launch_options(compensated: bool) -> dict:
    """Compensated arithmetic needs every fp32 add and multiply rounded as written: no fma
    contraction (the fmas it needs are explicit)."""
    return {"enable_fp_fusion": False} if compensated else {}
