"""The selector's CPU GEMM choice (omnisift_kernels.cpu_gemm) and the extension's huge-page outputs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from omnisift_kernels import PRESETS, VisionGuidedAudioSelector, compress, cpu_gemm
from omnisift_kernels._ext import ext_has_kernel
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.testing import near_tie_differences, tolerance
from omnisift_kernels.testing import set_cpu_env

ONEDNN = cpu_gemm._onednn_linear_available()
POLICIES = [("aten", "native"), ("auto", "auto"), ("aten", "fp32"), ("onednn", "native"), ("onednn", "fp32")]


@pytest.fixture
def policy(monkeypatch):
    def set_policy(lib: str, half: str) -> dict[str, str]:
        monkeypatch.setenv("OMNISIFT_CPU_GEMM", lib)
        monkeypatch.setenv("OMNISIFT_CPU_HALF_GEMM", half)
        return cpu_gemm.gemm_policy()

    return set_policy


def test_policy_from_environment(policy, monkeypatch):
    min_rows = 0 if cpu_gemm._cpu_has_avx512() else cpu_gemm.MIN_ROWS
    assert policy("aten", "fp32") == {"fp32": "aten", "half": "native", "onednn_min_rows": min_rows}  # both off
    assert policy("onednn", "fp32") == {"fp32": "onednn" if ONEDNN else "aten", "half": "fp32",
                                        "onednn_min_rows": min_rows}
    assert policy("onednn", "native")["half"] == "native"
    auto = policy("auto", "auto")
    assert auto["fp32"] == ("onednn" if cpu_gemm.cpu_vendor() == "amd" and ONEDNN else "aten")
    assert auto["half"] == ("native" if cpu_gemm._cpu_has_avx512() else "fp32")
    monkeypatch.setenv("OMNISIFT_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="OMNISIFT_CPU_GEMM must be one of auto, aten, onednn, got 'mkl'"):
        cpu_gemm.gemm_policy()
    monkeypatch.setenv("OMNISIFT_CPU_GEMM", "auto")
    monkeypatch.setenv("OMNISIFT_CPU_HALF_GEMM", "bf16")
    with pytest.raises(ValueError, match="OMNISIFT_CPU_HALF_GEMM"):
        cpu_gemm.gemm_policy()


def test_onednn_takes_only_large_gemms(policy):
    pol = policy("onednn", "auto")
    want = "onednn" if ONEDNN else "aten"
    assert cpu_gemm.fp32_library(1980, 512, 3584, pol) == want  # v_proj over the surviving video
    assert cpu_gemm.fp32_library(1980, 1024, 512, pol) == want  # keys and values
    assert cpu_gemm.fp32_library(500, 512, 512, pol) == (want if pol["onednn_min_rows"] <= 500 else "aten")  # Q, O
    assert cpu_gemm.fp32_library(4000, 8, 8, pol) == "aten"  # tiny
    assert cpu_gemm.fp32_library(500, 1, 256, pol) == "aten"  # the score head's output: below MIN_MACS
    assert cpu_gemm.fp32_library(1980, 512, 3584, policy("aten", "auto")) == "aten"
    # a_proj (500 rows): oneDNN where the CPU has AVX-512 (Zen 4), MKL without (Zen 3).
    assert cpu_gemm.fp32_library(500, 512, 3584, dict(pol, onednn_min_rows=0)) == want
    assert cpu_gemm.fp32_library(500, 512, 3584, dict(pol, onednn_min_rows=cpu_gemm.MIN_ROWS)) == "aten"
    assert cpu_gemm.fp32_library(1024, 512, 3584, dict(pol, onednn_min_rows=cpu_gemm.MIN_ROWS)) == want


@pytest.mark.parametrize("lib, half", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [3, 600])  # 2 x 600 rows x 512 x 512: above MIN_ROWS and MIN_MACS
def test_linear_equals_f_linear_within_rounding(policy, lib, half, dtype, rows):
    policy(lib, half)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 512, generator=gen).to(dtype)
    w = (torch.randn(512, 512, generator=gen) / 512 ** 0.5).to(dtype)
    b = torch.randn(512, generator=gen).to(dtype)
    xin = x.float() if cpu_gemm.compute_dtype(dtype, x.device) == torch.float32 else x
    got = cpu_gemm.linear(xin, w, b)
    assert got.dtype == dtype and got.shape == (2, rows, 512)
    exact = F.linear(x.double(), w.double(), b.double())
    atol, rtol = tolerance(dtype, "native")
    torch.testing.assert_close(got.double(), exact, atol=atol, rtol=rtol)
    if dtype != torch.float32 and xin.dtype == torch.float32:
        # Widened: fp32 accumulation (error <= K * eps32 * sum |x w|) rounded once (<= 1 ulp here).
        magnitude = F.linear(x.double().abs(), w.double().abs(), b.double().abs())
        bound = exact.abs() * torch.finfo(dtype).eps + 512 * torch.finfo(torch.float32).eps * magnitude
        assert ((got.double() - exact).abs() <= bound).all()
    if lib == "aten" and (half == "native" or dtype == torch.float32):
        assert torch.equal(got, F.linear(x, w, b))  # ATen everywhere: F.linear itself


def test_linear_keeps_autograd_and_compile_paths(policy):
    policy("onednn", "fp32")
    x = torch.randn(1200, 512)
    lin = torch.nn.Linear(512, 512)
    out = cpu_gemm.linear(x, lin.weight, lin.bias)  # parameters require grad: F.linear
    assert out.grad_fn is not None and torch.equal(out, F.linear(x, lin.weight, lin.bias))
    out.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        fast = cpu_gemm.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(fast, out.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not ONEDNN, reason="needs oneDNN")
def test_packed_weights_follow_updates_and_owners(policy):
    """oneDNN GEMMs reuse a weight reordered once; an in-place update (an optimizer step) or new data
    repacks it, and the packed copy goes with the weight."""
    import gc

    policy("onednn", "native")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1100, 512, generator=gen)
    w = torch.randn(256, 512, generator=gen) / 512 ** 0.5
    b = torch.randn(256, generator=gen)
    with torch.no_grad():
        first = cpu_gemm.linear(x, w, b)
        assert torch.equal(first, cpu_gemm.linear(x, w, b))  # packed once, same bits again
        torch.testing.assert_close(first, F.linear(x, w, b), atol=1e-4, rtol=1e-4)
        n_packed = len(cpu_gemm._PACKED)
        w.mul_(2.0)  # in place: the version counter moves
        torch.testing.assert_close(cpu_gemm.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
        q = w[:128]  # a view: packed per (owner, offset, shape)
        torch.testing.assert_close(cpu_gemm.linear(x, q, b[:128]), F.linear(x, q, b[:128]), atol=1e-4, rtol=1e-4)
        assert len(cpu_gemm._PACKED) >= n_packed + 1
        del q, w
        gc.collect()
        assert not any(k[4] == torch.float32 and k[2] == (256, 512) for k in cpu_gemm._PACKED)


def test_compute_dtype(policy):
    policy("auto", "fp32")
    assert cpu_gemm.compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert cpu_gemm.compute_dtype(torch.float16, torch.device("cpu")) == torch.float32
    assert cpu_gemm.compute_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert cpu_gemm.compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    policy("auto", "native")
    assert cpu_gemm.compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("lib, half", POLICIES)
@pytest.mark.parametrize("selector_dtype, x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_fast_path_matches_reference_under_each_policy(policy, lib, half, selector_dtype, x_dtype):
    """A clip large enough for the large-GEMM choice (D = 2048, 16 x 16 frames, 16 s: v_proj is
    about [1360, 2048] x [2048, 512], above MIN_ROWS and MIN_MACS): the fast path's keep mask
    equals the reference's up to near ties, its packed rows are exact and its scores within the
    tolerance of the selector's dtype."""
    policy(lib, half)
    torch.manual_seed(5)
    sel = VisionGuidedAudioSelector(2048).eval().requires_grad_(False).to(selector_dtype)
    batch = make_batch([clip_row(16, 16, 16)], 2048, dtype=x_dtype, seed=11)
    kw = dict(batch.compress_kwargs(), selector=sel, rho_video=PRESETS["paper-35"].rho_video,
              rho_audio=PRESETS["paper-35"].rho_audio)
    ref = compress(**kw, backend="reference")
    fast = compress(**kw, backend="cpu")
    near_tie_differences(fast.keep_mask, ref.keep_mask, ref.audio_scores, batch.inputs_embeds, batch.input_ids,
                         batch.position_ids, batch.attention_mask, video_token_id=batch.video_token_id,
                         audio_token_id=batch.audio_token_id, selector_dtype=selector_dtype)
    flat = batch.inputs_embeds.flatten(0, 1)
    assert torch.equal(fast.inputs_embeds, flat[fast.indices])
    atol, rtol = tolerance(selector_dtype, "score")
    torch.testing.assert_close(fast.audio_scores, ref.audio_scores, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# Large outputs of the extension's CPU kernels: the cache of freed blocks and huge pages (csrc/cpu_alloc.h)

needs_gather = pytest.mark.skipif(not ext_has_kernel("varlen_gather", "CPU"), reason="needs the extension")


@needs_gather
@pytest.mark.parametrize("cache_mb", [None, "0"])
@pytest.mark.parametrize("hugepages", ["1", "0"])
@pytest.mark.parametrize("rows", [5, 600, 9000])  # 2.4 MB: cached; 36.9 MB: cached, huge pages when new
def test_large_outputs_are_ordinary_tensors(monkeypatch, hugepages, rows, cache_mb):
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_HUGEPAGES", hugepages)
    if cache_mb is not None:
        set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", cache_mb)
    src = torch.randn(10000, 1024)
    idx = torch.randint(0, 10000, (rows,))
    out = torch.ops.omnisift.varlen_gather(src, idx)
    assert torch.equal(out, src[idx]) and out.is_contiguous() and out.shape == (rows, 1024)
    out.add_(1)  # writable, owns its memory
    assert torch.equal(out, src[idx] + 1)
    out.resize_(rows + 7, 1024)  # still resizable (torch's allocator takes over)
    assert torch.equal(out[:rows], src[idx] + 1)
    clone = out.clone()
    del out
    assert clone.shape == (rows + 7, 1024)


def _cache_bytes() -> int:
    return torch.ops.omnisift.cpu_output_cache_bytes()


@pytest.fixture
def empty_output_cache(monkeypatch):
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", None)
    torch.ops.omnisift.release_cpu_output_cache()
    yield
    torch.ops.omnisift.release_cpu_output_cache()


MIB = 1 << 20


@needs_gather
def test_freed_outputs_are_cached_and_reused(empty_output_cache):
    src = torch.randn(4096, 1024)
    idx = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:1000]
    out = torch.ops.omnisift.varlen_gather(src, idx)  # 4,096,000 bytes: a 4 MiB block
    ptr = out.data_ptr()
    assert _cache_bytes() == 0
    del out
    assert _cache_bytes() == 4 * MIB
    # A request of at least half the block reuses it (old contents overwritten), and leaves the cache.
    again = torch.ops.omnisift.varlen_gather(src, idx[:600])  # 2.4 MB -> 4 MiB block: 3 MiB would do, fits
    assert again.data_ptr() == ptr and _cache_bytes() == 0
    assert torch.equal(again, src[idx[:600]])
    del again
    # Smaller than half: a new block; the cached one stays. Below 2 MiB capacities step by 256 KiB.
    small = torch.ops.omnisift.varlen_gather(src, idx[:300])  # 1.2 MB -> a 1.25 MiB block
    assert small.data_ptr() != ptr and _cache_bytes() == 4 * MIB
    assert torch.equal(small, src[idx[:300]])
    del small
    assert _cache_bytes() == 4 * MIB + 5 * MIB // 4
    quarter = torch.ops.omnisift.varlen_gather(src, idx[:75])  # 307,200 bytes -> a 512 KiB block
    del quarter
    held = 4 * MIB + 5 * MIB // 4 + MIB // 2
    assert _cache_bytes() == held
    # Below 256 KiB: torch's allocator, never cached.
    tiny = torch.ops.omnisift.varlen_gather(src, idx[:10])
    del tiny
    assert _cache_bytes() == held
    assert torch.ops.omnisift.release_cpu_output_cache() == held and _cache_bytes() == 0


@needs_gather
def test_output_cache_default_limit(monkeypatch):
    """Unset, the limit is 1/16 of the physical memory within [256 MiB, 4 GiB]; the variable overrides it."""
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", None)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert torch.ops.omnisift.cpu_output_cache_limit() == min(4096 * MIB, max(256 * MIB, physical // 16))
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", "300")
    assert torch.ops.omnisift.cpu_output_cache_limit() == 300 * MIB
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", "off")
    assert torch.ops.omnisift.cpu_output_cache_limit() == 0


@needs_gather
def test_output_cache_limit_and_off(empty_output_cache, monkeypatch):
    src = torch.randn(4096, 1024)
    idx = torch.arange(1000)
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", "9")
    a, b, c = (torch.ops.omnisift.varlen_gather(src, idx) for _ in range(3))  # three 4 MiB blocks
    kept = {b.data_ptr(), c.data_ptr()}
    del a, b, c  # freed in this order: the third block pushes the first out of a 9 MiB cache
    assert _cache_bytes() == 8 * MIB
    reuse = [torch.ops.omnisift.varlen_gather(src, idx) for _ in range(2)]
    assert {o.data_ptr() for o in reuse} == kept
    assert _cache_bytes() == 0
    del reuse
    for off in ("0", "off", "-3"):
        set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", off)
        torch.ops.omnisift.release_cpu_output_cache()
        out = torch.ops.omnisift.varlen_gather(src, idx)
        assert torch.equal(out, src[idx])
        del out
        assert _cache_bytes() == 0
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_OUTPUT_CACHE_MB", "2")  # a 4 MiB block exceeds the limit: freed
    out = torch.ops.omnisift.varlen_gather(src, idx)
    del out
    assert _cache_bytes() == 0


@needs_gather
def test_fast_path_reuses_its_outputs(empty_output_cache):
    """Two calls of the fast path on the same clip: the second takes its large outputs (the surviving
    video rows, the packed embeddings) from the cache and returns the same result."""
    torch.manual_seed(5)
    sel = VisionGuidedAudioSelector(1024).eval().requires_grad_(False)
    batch = make_batch([clip_row(8, 16, 16)], 1024, seed=3)
    kw = dict(batch.compress_kwargs(), selector=sel, rho_video=0.5, rho_audio=0.5)
    expected = compress(**kw, backend="reference").inputs_embeds  # fp32 selector: exact agreement
    first = compress(**kw, backend="cpu")
    assert torch.equal(first.inputs_embeds, expected)
    del first
    held = _cache_bytes()
    assert held >= 2 * MIB  # both outputs are over 1 MiB
    second = compress(**kw, backend="cpu")
    assert _cache_bytes() < held
    assert torch.equal(second.inputs_embeds, expected)


needs_scope = pytest.mark.skipif(not torch._C._dispatch_has_kernel("omnisift::cpu_allocator_scope"),
                                 reason="needs the extension")


@needs_scope
def test_allocator_scope_serves_torch_allocations(empty_output_cache):
    """Inside the scope every CPU allocation goes through the cache's allocator (blocks of 256 KiB or more
    come back to the cache when freed, smaller ones are freed); outside it torch's allocator is back."""
    assert torch.ops.omnisift.cpu_allocator_scope(True)
    try:
        big = torch.ones(1 << 20)  # 4 MiB
        small = torch.ones(1000)
        empty = torch.empty(0)
        grown = torch.ones(10)
        grown.resize_(1 << 19)  # resized inside: a 2 MiB block
        assert big.sum() == 1 << 20 and small.sum() == 1000 and empty.numel() == 0
        assert torch.ops.omnisift.cpu_allocator_scope(True)  # nested
        assert torch.ops.omnisift.cpu_allocator_scope(False)  # still open: the outer scope
    finally:
        assert not torch.ops.omnisift.cpu_allocator_scope(False)
    del big, small, empty
    assert _cache_bytes() == 4 * MIB
    grown.resize_(1 << 20)  # outside: its storage's allocator (the cache's) serves the new 4 MiB block
    assert _cache_bytes() == 2 * MIB  # the cached 4 MiB block taken, the old 2 MiB one cached
    assert grown[:10].sum() == 10
    del grown
    held = _cache_bytes()
    outside = torch.ones(1 << 20)
    del outside
    assert _cache_bytes() == held  # torch's allocator again
    assert not torch.ops.omnisift.cpu_allocator_scope(False)  # closing with none open: no-op


@needs_scope
def test_fast_path_restores_the_allocator_on_errors(empty_output_cache):
    torch.manual_seed(5)
    sel = VisionGuidedAudioSelector(64).eval().requires_grad_(False)
    batch = make_batch([clip_row(4, 8, 8)], 64, seed=3)
    kw = dict(batch.compress_kwargs(), selector=sel, rho_video=0.5, rho_audio=0.5)
    bad = batch.inputs_embeds.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress(**dict(kw, inputs_embeds=bad), backend="cpu", validate=True)
    held = _cache_bytes()
    outside = torch.ones(1 << 20)
    del outside
    assert _cache_bytes() == held
    assert not torch.ops.omnisift.cpu_allocator_scope(False)


@needs_gather
def test_gather_ste_forward_uses_the_extension_exactly(monkeypatch):
    from omnisift_kernels.ops import gather_ste

    x = torch.randn(2, 5000, 1024)
    idx = torch.randperm(10000)[:9000].sort().values
    scores = torch.rand(2, 5000)
    for hp in ("1", "0"):
        set_cpu_env(monkeypatch, "OMNISIFT_CPU_HUGEPAGES", hp)
        assert torch.equal(gather_ste(x, idx, scores), x.flatten(0, 1)[idx])
    # A view whose rows do not merge: the torch path, same values.
    xt = torch.randn(5000, 2, 1024).transpose(0, 1)
    assert torch.equal(gather_ste(xt, idx, scores), xt.reshape(10000, 1024)[idx])
