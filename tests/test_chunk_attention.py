"""The selector's chunk attention on the CPU: the extension's AVX-512 kernel
(``omnisift::chunk_attention_cpu``) against ``scaled_dot_product_attention``
(:func:`omnisift_kernels.ops.chunk_attention.heads_attention`), its errors, and when the fast path uses it."""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels import compress
from omnisift_kernels.ops import chunk_attention as cpu_attention
from omnisift_kernels._ext import ext_has_kernel
from omnisift_kernels.presets import PRESETS
from omnisift_kernels.ops.chunk_attention import heads_attention
from omnisift_kernels.selector import VisionGuidedAudioSelector
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.testing import tolerance
from omnisift_kernels.testing import set_cpu_env

available = ext_has_kernel("chunk_attention_cpu", "CPU") and bool(torch.ops.omnisift.chunk_attention_cpu_available())
needs_kernel = pytest.mark.skipif(not available, reason="needs the extension's AVX-512 CPU kernels")


def _inputs(C, La, Lv, heads, head_dim, padding, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    E = heads * head_dim
    q = torch.randn(C, La, E, generator=g) * scale
    kv = torch.randn(C, Lv, 2 * E, generator=g)
    mask = None
    if padding == "right":
        lengths = torch.randint(1, Lv + 1, (C,), generator=g)
        mask = torch.arange(Lv)[None] >= lengths[:, None]
    elif padding == "scattered":
        mask = torch.rand(C, Lv, generator=g) < 0.5
        mask[torch.arange(C), torch.randint(0, Lv, (C,), generator=g)] = False  # >= 1 real key
    return q, kv[..., :E], kv[..., E:], mask


@needs_kernel
@pytest.mark.parametrize("C, La, Lv, heads, head_dim", [
    (10, 50, 198, 8, 64),   # omni7b-20s at paper-35
    (3, 70, 13, 8, 64),     # two query tiles, the last one partial; 13 keys = 2 blocks of 6 + 1
    (2, 1, 1, 4, 16),
    (5, 130, 7, 2, 48),     # three query tiles
    (1, 17, 300, 16, 32),
    (4, 64, 6, 8, 64),      # exactly one tile, one key block
    (2, 33, 11, 1, 64),
])
@pytest.mark.parametrize("padding", [None, "right", "scattered"])
def test_kernel_equals_sdpa(C, La, Lv, heads, head_dim, padding):
    q, k, v, mask = _inputs(C, La, Lv, heads, head_dim, padding)
    got = torch.ops.omnisift.chunk_attention_cpu(q, k, v, mask, heads)
    atol, rtol = tolerance(torch.float32, "native")
    torch.testing.assert_close(got, heads_attention(q, k, v, mask, heads), atol=atol, rtol=rtol)


@needs_kernel
def test_kernel_on_peaked_and_flat_softmax():
    """Scores of hundreds (one key takes all the weight, the others underflow) and of zero (uniform)."""
    q, k, v, mask = _inputs(3, 20, 40, 8, 64, "right", seed=1, scale=60.0)
    atol, rtol = tolerance(torch.float32, "native")
    got = torch.ops.omnisift.chunk_attention_cpu(q, k, v, mask, 8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, heads_attention(q, k, v, mask, 8), atol=atol, rtol=rtol)
    zero_q = torch.zeros_like(q)
    torch.testing.assert_close(torch.ops.omnisift.chunk_attention_cpu(zero_q, k, v, None, 8),
                               heads_attention(zero_q, k, v, None, 8), atol=atol, rtol=rtol)


@needs_kernel
def test_kernel_accuracy_with_thousands_of_keys():
    """Sums over 2,000 keys (large frames) stay as accurate as ATen's against an fp64 computation:
    the kernel adds keys in blocks, so its rounding does not grow with the key count."""
    q, k, v, mask = _inputs(2, 100, 2000, 32, 16, "scattered", seed=7, scale=3.0)
    got = torch.ops.omnisift.chunk_attention_cpu(q, k, v, mask, 32).double()
    exact = heads_attention(q.double(), k.double(), v.double(), mask, 32)
    sdpa = heads_attention(q, k, v, mask, 32).double()
    atol, rtol = tolerance(torch.float32, "native")
    torch.testing.assert_close(got, exact, atol=atol, rtol=rtol)
    assert (got - exact).abs().max() <= 2 * (sdpa - exact).abs().max() + 1e-7


@needs_kernel
def test_kernel_reads_strided_views_in_place():
    """Queries as a view with a row stride; keys and values as the halves of one projection."""
    base = torch.randn(4, 25, 3 * 128)
    q = base[..., 128:256]
    _, k, v, mask = _inputs(4, 25, 9, 2, 64, "right", seed=3)
    atol, rtol = tolerance(torch.float32, "native")
    torch.testing.assert_close(torch.ops.omnisift.chunk_attention_cpu(q, k, v, mask, 2),
                               heads_attention(q, k, v, mask, 2), atol=atol, rtol=rtol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_widened(dtype):
    """bf16/fp16 heads: widened to fp32, attended, rounded back; within the half precision tolerance
    of ATen's attention in that dtype."""
    q, k, v, mask = _inputs(4, 30, 20, 8, 64, "right", seed=5)
    q, kv = q.to(dtype), torch.cat([k, v], -1).to(dtype)
    k, v = kv[..., :512], kv[..., 512:]
    got = cpu_attention.chunk_attention(q, k, v, mask, 8)
    assert got.dtype == dtype
    atol, rtol = tolerance(dtype, "native")
    torch.testing.assert_close(got.float(), heads_attention(q, k, v, mask, 8).float(), atol=atol, rtol=rtol)
    # The kernel reads the half precision rows in place and widens them exactly: its fp32 output is
    # what it computes from fp32 copies (the same operations on the same values), bit for bit.
    op = torch.ops.omnisift.chunk_attention_cpu
    native = op(q, k, v, mask, 8)
    assert native.dtype == torch.float32
    assert torch.equal(native, op(q.float(), k.float(), v.float(), mask, 8))
    assert torch.equal(got, native.to(dtype))


@needs_kernel
def test_kernel_errors():
    q, k, v, mask = _inputs(2, 5, 4, 2, 64, None)
    op = torch.ops.omnisift.chunk_attention_cpu
    with pytest.raises(ValueError, match="no real key"):
        op(q, k, v, torch.ones(2, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="head_dim must be 16, 32, 48 or 64"):
        op(q, k, v, None, 1)  # head_dim 128
    with pytest.raises(ValueError, match="num_heads must divide"):
        op(q, k, v, None, 3)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        op(q.double(), k, v, None, 2)
    with pytest.raises(TypeError, match="one dtype"):
        op(q, k.bfloat16(), v.bfloat16(), None, 2)
    with pytest.raises(ValueError, match="key_padding must be bool"):
        op(q, k, v, torch.zeros(2, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="same strides"):
        op(q, k, v.contiguous(), None, 2)
    with pytest.raises(ValueError, match="contiguous last"):
        op(q.transpose(1, 2), k, v, None, 2)
    assert op(q[:, :0], k, v, None, 2).shape == (2, 0, 128)


def test_dispatch(monkeypatch):
    q, k, v, mask = _inputs(2, 5, 4, 2, 64, "right")
    monkeypatch.delenv("OMNISIFT_CPU_ATTENTION", raising=False)
    assert cpu_attention.kernel_serves(q, k, v, 2) == available
    assert cpu_attention.kernel_serves(q.bfloat16(), k.bfloat16(), v.bfloat16(), 2) == available
    assert not cpu_attention.kernel_serves(q.bfloat16(), k, v, 2)  # mixed dtypes
    assert not cpu_attention.kernel_serves(q.double(), k.double(), v.double(), 2)
    assert not cpu_attention.kernel_serves(q, k, v, 1)  # head_dim 128
    assert not cpu_attention.kernel_serves(q.requires_grad_(), k, v, 2)
    with torch.no_grad():
        assert cpu_attention.kernel_serves(q, k, v, 2) == available
    q = q.detach()
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "sdpa")
    assert not cpu_attention.kernel_serves(q, k, v, 2)
    assert torch.equal(cpu_attention.chunk_attention(q, k, v, mask, 2), heads_attention(q, k, v, mask, 2))
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "fast")
    with pytest.raises(ValueError, match="OMNISIFT_CPU_ATTENTION must be auto or sdpa"):
        cpu_attention.chunk_attention(q, k, v, mask, 2)
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "auto")
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_ISA", "avx2")  # below AVX-512: no kernel, SDPA
    assert not cpu_attention.kernel_serves(q, k, v, 2)


@pytest.mark.parametrize("frames", [(16, 16), (13, 23)])
def test_fast_path_with_and_without_the_kernel(monkeypatch, frames):
    """The CPU fast path gives the same masks with the kernel as with SDPA, scores within fp32
    rounding (near ties aside: none at these seeds)."""
    torch.manual_seed(2)
    sel = VisionGuidedAudioSelector(256).eval().requires_grad_(False)
    batch = make_batch([clip_row(6, *frames), clip_row(5, *frames)], 256, seed=4)
    kw = dict(batch.compress_kwargs(), selector=sel, rho_video=PRESETS["paper-35"].rho_video,
              rho_audio=PRESETS["paper-35"].rho_audio, backend="cpu")
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "sdpa")
    sdpa = compress(**kw)
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "auto")
    fast = compress(**kw)
    assert torch.equal(fast.keep_mask, sdpa.keep_mask)
    atol, rtol = tolerance(torch.float32, "score")
    torch.testing.assert_close(fast.audio_scores, sdpa.audio_scores, atol=atol, rtol=rtol)
