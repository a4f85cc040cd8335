"""Which library computes the selector's inference GEMMs on the CPU.

The selector's projections are most of the fast path's time on the CPU. Two choices matter there
(their measurements, per CPU, with the commands that made them: ``docs/cpu.md``):

* **fp32**: ATen's ``F.linear`` calls MKL. On AMD CPUs oneDNN's fp32 matmul
  (``torch.ops.mkldnn._linear_pointwise``) measured faster at the selector's tall GEMMs
  (``python -m bench.cpu_choices``), but not far below ``MIN_MACS`` multiply-adds, and on CPUs
  without AVX-512 not below ``MIN_ROWS`` rows. So on AMD oneDNN takes fp32 GEMMs of at least
  ``MIN_MACS`` multiply-adds, and where the CPU lacks AVX-512 only those of at least ``MIN_ROWS``
  rows. On Intel CPUs it was not faster: MKL stays.
* **bf16/fp16** parameters on a CPU without AVX-512 (AVX2 only): ATen has no vectorized half
  precision GEMM there and falls far behind its fp32 GEMM. The inputs are then widened to fp32
  (exact), multiplied with the fp32 GEMM (fp32 accumulation, as every bf16 GEMM accumulates) and the
  result rounded to the parameters' dtype, which is what a bf16 GEMM computes; only the summation
  order differs, as between any two GEMM libraries.

Where oneDNN is chosen, it also takes the bf16 GEMMs of the same sizes on CPUs where it computes
bf16 natively (AVX-512 with BF16 instructions), rather than through ``F.linear``; and its weights
are reordered into its blocked layout once per weight and version (:func:`_packed_weight`; one
reordered copy per weight used is kept while the weight lives), not on every call: bit-identical
results without the per-call reorder.

Widening applies at every size. All of this only on the CPU, outside ``torch.compile`` tracing and when
no gradient is recorded (training keeps ``F.linear`` and its autograd). Results differ from
``F.linear`` by fp32 rounding, so selector scores equal the reference's within the tolerance table
and masks equal it up to near ties (:func:`omnisift_kernels.testing.near_tie_differences`).

Environment (read at each call):
    ``OMNISIFT_CPU_GEMM``: ``auto`` (default: oneDNN on AMD, ATen elsewhere), ``aten`` (always
    ``F.linear``: every choice off) or ``onednn`` (oneDNN for the large GEMMs on any CPU).
    ``OMNISIFT_CPU_HALF_GEMM``: ``auto`` (default: widen to fp32 where the CPU lacks AVX-512),
    ``native`` (ATen's half precision GEMM) or ``fp32`` (always widen).
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F

from ._ext import outside_cpu_block_cache

__all__ = ["linear", "compute_dtype", "gemm_policy"]

#: oneDNN takes fp32 GEMMs of at least ``MIN_MACS`` multiply-adds (smaller ones: ``F.linear``), and on
#: CPUs without AVX-512 only those of at least ``MIN_ROWS`` rows.
MIN_ROWS = 1024
MIN_MACS = 1 << 24

_HALF = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """``"amd"``, ``"intel"`` or ``"other"`` (from /proc/cpuinfo; "other" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    return {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(vendor, "other")
    except OSError:
        pass
    return "other"


@functools.lru_cache(maxsize=None)
def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _onednn_bf16_native() -> bool:
    """oneDNN computes bf16 natively here (AVX-512 with BF16 instructions, or AMX)."""
    try:
        return _cpu_has_avx512() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _env(name: str, allowed: tuple[str, ...], raw: str | None) -> str:
    value = (raw or "auto").strip().lower() or "auto"
    if value not in allowed:
        raise ValueError(f"omnisift_kernels: {name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def gemm_policy() -> dict:
    """The choices in force: ``{"fp32": "onednn"|"aten", "half": "fp32"|"native", "onednn_min_rows":
    int}`` (the fewest rows of a GEMM oneDNN takes: 0 on CPUs with AVX-512, ``MIN_ROWS`` without)."""
    return dict(_policy_for(os.environ.get("OMNISIFT_CPU_GEMM"), os.environ.get("OMNISIFT_CPU_HALF_GEMM")))


@functools.lru_cache(maxsize=64)
def _policy_for(gemm_env: str | None, half_env: str | None) -> tuple:
    """:func:`gemm_policy` for these values of the two variables (cached: a fast-path call asks once
    per GEMM)."""
    lib = _env("OMNISIFT_CPU_GEMM", ("auto", "aten", "onednn"), gemm_env)
    half = _env("OMNISIFT_CPU_HALF_GEMM", ("auto", "native", "fp32"), half_env)
    min_rows = 0 if _cpu_has_avx512() else MIN_ROWS
    if lib == "aten":
        return (("fp32", "aten"), ("half", "native"), ("onednn_min_rows", min_rows))
    if lib == "auto":
        lib = "onednn" if cpu_vendor() == "amd" else "aten"
    if lib == "onednn" and not _onednn_linear_available():
        lib = "aten"
    if half == "auto":
        half = "native" if _cpu_has_avx512() else "fp32"
    return (("fp32", lib), ("half", half), ("onednn_min_rows", min_rows))


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU, not tracing, no gradient recorded."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def fp32_library(rows: int, n: int, k: int, policy: dict | None = None) -> str:
    """``"onednn"`` or ``"aten"``: the library of an fp32 ``[rows, k] x [k, n]`` inference GEMM."""
    policy = gemm_policy() if policy is None else policy
    large = rows >= policy["onednn_min_rows"] and rows * n * k >= MIN_MACS
    return policy["fp32"] if large else "aten"


def compute_dtype(param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the large inference GEMMs read their inputs in: fp32 where half precision
    parameters are widened (see the module docstring), else ``param_dtype``. A caller that gathers
    rows for the selector can produce them in this dtype directly (only exact when the source rows
    are already in ``param_dtype`` or in fp32 with ``param_dtype`` fp32)."""
    if torch.compiler.is_compiling() or param_dtype not in _HALF or torch.device(device).type != "cpu":
        return param_dtype  # (under tracing, linear() is F.linear: nothing to widen)
    return torch.float32 if gemm_policy()["half"] == "fp32" else param_dtype


# Weights reordered into oneDNN's blocked layout, per weight: key -> (weak reference to the tensor
# owning the storage, its version counter at packing time, the packed weight). A hit needs the same
# live owner and an unchanged version (in-place updates, e.g. an optimizer step, bump it); an entry
# goes when its owner is collected.
_PACKED: dict[tuple, tuple] = {}


def _packed_weight(weight: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """``weight`` (a view of a parameter is fine) in ``dtype``, reordered for oneDNN's matmul once
    (``mkldnn._reorder_linear_weight``; the GEMM then skips that reorder on every call). Results are
    bit-identical to the plain weight's."""
    owner = weight._base if weight._base is not None else weight
    key = (id(owner), weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, dtype)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is owner and hit[1] == weight._version:
        return hit[2]
    with outside_cpu_block_cache():  # it outlives the call; ideep frees it with the allocator current then
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype).contiguous(), rows)
    _PACKED[key] = (weakref.ref(owner, lambda _ref, key=key: _PACKED.pop(key, None)), weight._version, packed)
    return packed


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """oneDNN's matmul of ``x`` (already in ``dtype``) with ``weight`` and ``bias`` in ``dtype``."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).contiguous()
    b = None if bias is None else bias.to(dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows, _packed_weight(weight, dtype, rows.shape[0]), b, "none", [], "")
    return out.view(*shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in the parameters' dtype, computed as chosen above.

    Args:
        x: ``[..., K]`` in ``weight``'s dtype, or in fp32 when ``weight`` is bf16/fp16 and
            :func:`compute_dtype` says fp32 (then the values must be representable in ``weight``'s
            dtype, e.g. widened bf16: they are not rounded again).
        weight: ``[N, K]``; bias: ``[N]`` or None.

    Returns:
        ``[..., N]`` in ``weight``'s dtype.
    """
    if not _eligible(x, weight, bias):
        return F.linear(x.to(weight.dtype), weight, bias)
    policy = gemm_policy()
    lib = fp32_library(x.numel() // max(x.shape[-1], 1), weight.shape[0], weight.shape[1], policy)
    widen = weight.dtype in _HALF and policy["half"] == "fp32"
    if lib == "onednn" and (weight.dtype == torch.float32 or widen or
                            (weight.dtype == torch.bfloat16 and _onednn_bf16_native())):
        # fp32, widened half precision (fp32 GEMM, one rounding), or bf16 where oneDNN has native bf16.
        dtype = torch.float32 if widen else weight.dtype
        return _onednn_linear(x.to(dtype), weight, bias, dtype).to(weight.dtype)
    if widen:
        out = F.linear(x.to(torch.float32), weight.float(), None if bias is None else bias.float())
        return out.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias)
