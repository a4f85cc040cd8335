"""The selector's chunk attention on the CPU, against the fp64 reference
(:func:`omnisift_kernels.reference.chunk_attention.chunk_attention`): the extension's AVX-512 kernel
(``omnisift::chunk_attention_cpu``, called directly or through a dispatch that must have chosen it),
the ``scaled_dot_product_attention`` path (:func:`omnisift_kernels.ops.chunk_attention.heads_attention`),
the kernel's errors, and when the fast path uses it.

Tolerances come from ``omnisift_kernels.testing.TOLERANCES``: ``"similarity"`` for an fp32 output
computed from the inputs' values (the kernel widens bf16/fp16 exactly), ``"native"`` for an output
rounded to (or computed in) a half precision dtype.
"""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels import compress
from omnisift_kernels import pipeline
from omnisift_kernels._ext import ext_has_kernel
from omnisift_kernels.ops import chunk_attention as cpu_attention
from omnisift_kernels.ops.chunk_attention import heads_attention
from omnisift_kernels.presets import PRESETS
from omnisift_kernels.reference.chunk_attention import chunk_attention as reference_attention
from omnisift_kernels.selector import VisionGuidedAudioSelector
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.testing import assert_close_scores, near_tie_differences, set_cpu_env

EXT_BUILT = ext_has_kernel("chunk_attention_cpu", "CPU")
available = EXT_BUILT and bool(torch.ops.omnisift.chunk_attention_cpu_available())
if not EXT_BUILT:
    _WHY = "the extension (omnisift_kernels._C) is not built or has no chunk_attention_cpu kernel"
else:
    _WHY = (f"chunk_attention_cpu needs the AVX-512 CPU kernels; this process runs "
            f"'{torch.ops.omnisift.cpu_kernels_isa()}' (a CPU without AVX-512, or OMNISIFT_CPU_ISA below it)")
needs_kernel = pytest.mark.skipif(not available, reason=_WHY)

kernel = torch.ops.omnisift.chunk_attention_cpu if EXT_BUILT else None


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


def _run(impl, q, k, v, mask, heads):
    """``impl``: "kernel" calls the extension's op itself, "sdpa" the scaled_dot_product_attention path."""
    if impl == "kernel":
        return kernel(q, k, v, mask, heads)
    return heads_attention(q, k, v, mask, heads)


IMPLS = [pytest.param("kernel", marks=needs_kernel), "sdpa"]


@pytest.mark.parametrize("impl", IMPLS)
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
def test_matches_reference(impl, C, La, Lv, heads, head_dim, padding):
    q, k, v, mask = _inputs(C, La, Lv, heads, head_dim, padding)
    got = _run(impl, q, k, v, mask, heads)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert_close_scores(got, reference_attention(q, k, v, mask, heads), torch.float32, "similarity")


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_and_flat_softmax(impl):
    """Scores of hundreds (one key takes all the weight, the others underflow) and of zero (uniform).

    Integer queries and keys in {-1, 0, 1}: the logits (integers / 8) are exact in fp32, so the
    comparison with the fp64 reference measures the softmax and the weighted sum, not the rounding
    of logits of hundreds (an fp32 logit of 200 is off by ~1e-5, and so is its weight)."""
    _, _, v, mask = _inputs(3, 20, 40, 8, 64, "right", seed=1)
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-500, 501, (3, 20, 512), generator=g).float()
    kv = torch.cat([torch.randint(-1, 2, (3, 40, 512), generator=g).float(), v], -1)
    k, v = kv[..., :512], kv[..., 512:]  # the halves of one projection, as the kernel reads them
    got = _run(impl, q, k, v, mask, 8)
    assert torch.isfinite(got).all()
    assert_close_scores(got, reference_attention(q, k, v, mask, 8), torch.float32, "similarity")
    zero_q = torch.zeros_like(q)
    assert_close_scores(_run(impl, zero_q, k, v, None, 8), reference_attention(zero_q, k, v, None, 8),
                        torch.float32, "similarity")


@needs_kernel
def test_kernel_accuracy_with_thousands_of_keys():
    """Sums over 2,000 keys (large frames) stay within the tolerance of the fp64 reference, and as
    accurate as ATen's attention: the kernel adds keys in blocks, so its rounding does not grow with
    the key count."""
    q, k, v, mask = _inputs(2, 100, 2000, 32, 16, "scattered", seed=7, scale=3.0)
    exact = reference_attention(q, k, v, mask, 32)
    got = kernel(q, k, v, mask, 32).double()
    assert_close_scores(got, exact, torch.float32, "similarity")
    sdpa = heads_attention(q, k, v, mask, 32).double()
    assert (got - exact).abs().max() <= 2 * (sdpa - exact).abs().max() + 1e-7


@pytest.mark.parametrize("impl", IMPLS)
def test_reads_strided_views_in_place(impl):
    """Queries as a view with a row stride; keys and values as the halves of one projection."""
    base = torch.randn(4, 25, 3 * 128, generator=torch.Generator().manual_seed(8))
    q = base[..., 128:256]
    _, k, v, mask = _inputs(4, 25, 9, 2, 64, "right", seed=3)
    assert_close_scores(_run(impl, q, k, v, mask, 2), reference_attention(q, k, v, mask, 2), torch.float32,
                        "similarity")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_widened(dtype, monkeypatch):
    """bf16/fp16 heads: widened to fp32, attended, rounded back; the dispatch picks the kernel for
    them, and the result is within the dtype's tolerance of the fp64 reference on the same values."""
    monkeypatch.delenv("OMNISIFT_CPU_ATTENTION", raising=False)
    q, k, v, mask = _inputs(4, 30, 20, 8, 64, "right", seed=5)
    q, kv = q.to(dtype), torch.cat([k, v], -1).to(dtype)
    k, v = kv[..., :512], kv[..., 512:]
    exact = reference_attention(q, k, v, mask, 8)
    assert cpu_attention.kernel_serves(q, k, v, 8)  # the dispatch below runs the kernel
    got = cpu_attention.chunk_attention(q, k, v, mask, 8)
    assert got.dtype == dtype
    assert_close_scores(got, exact, dtype, "native")  # rounded to the dtype once
    native = kernel(q, k, v, mask, 8)
    assert native.dtype == torch.float32
    assert_close_scores(native, exact, dtype, "similarity")  # fp32 from the same (widened) values
    # The kernel reads the half precision rows in place and widens them exactly: its fp32 output is
    # what it computes from fp32 copies (the same operations on the same values), bit for bit; the
    # public op rounds that output once.
    assert torch.equal(native, kernel(q.float(), k.float(), v.float(), mask, 8))
    assert torch.equal(got, native.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_half_precision(dtype):
    """The fallback in half precision (ATen's attention in that dtype) against the fp64 reference."""
    q, k, v, mask = _inputs(4, 30, 20, 8, 64, "right", seed=5)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    got = heads_attention(q, k, v, mask, 8)
    assert got.dtype == dtype
    assert_close_scores(got, reference_attention(q, k, v, mask, 8), dtype, "native")


@needs_kernel
def test_kernel_errors():
    q, k, v, mask = _inputs(2, 5, 4, 2, 64, None)
    op = kernel
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


def _spy_sdpa(monkeypatch):
    """Counts the calls of ``heads_attention`` made by ``chunk_attention`` (the SDPA fallback)."""
    calls = []

    def spy(*args):
        calls.append(1)
        return heads_attention(*args)

    monkeypatch.setattr(cpu_attention, "heads_attention", spy)
    return calls


def test_dispatch(monkeypatch):
    q, k, v, mask = _inputs(2, 5, 4, 2, 64, "right")
    exact = reference_attention(q, k, v, mask, 2)
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
    sdpa_calls = _spy_sdpa(monkeypatch)
    # auto: the kernel where it serves (no SDPA call), else SDPA; the reference's values either way.
    assert_close_scores(cpu_attention.chunk_attention(q, k, v, mask, 2), exact, torch.float32, "similarity")
    assert len(sdpa_calls) == (0 if available else 1)
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "sdpa")
    assert not cpu_attention.kernel_serves(q, k, v, 2)
    sdpa_calls.clear()
    assert_close_scores(cpu_attention.chunk_attention(q, k, v, mask, 2), exact, torch.float32, "similarity")
    assert len(sdpa_calls) == 1
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "fast")
    with pytest.raises(ValueError, match="OMNISIFT_CPU_ATTENTION must be auto or sdpa"):
        cpu_attention.chunk_attention(q, k, v, mask, 2)
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", "auto")
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_ISA", "avx2")  # below AVX-512: no kernel, SDPA
    assert not cpu_attention.kernel_serves(q, k, v, 2)


@pytest.mark.parametrize("choice", ["auto", "sdpa"])
@pytest.mark.parametrize("frames", [(16, 16), (13, 23)])
def test_fast_path_matches_reference(monkeypatch, frames, choice):
    """The CPU fast path, with the kernel (``auto`` where it serves) and with SDPA: the reference's
    keep mask (near ties aside: none at these seeds) and its audio scores within the fp32 score
    tolerance. Checks which attention the fast path really ran."""
    torch.manual_seed(2)
    sel = VisionGuidedAudioSelector(256).eval().requires_grad_(False)
    batch = make_batch([clip_row(6, *frames), clip_row(5, *frames)], 256, seed=4)
    kw = dict(batch.compress_kwargs(), selector=sel, rho_video=PRESETS["paper-35"].rho_video,
              rho_audio=PRESETS["paper-35"].rho_audio)
    ref = compress(**kw, backend="reference")
    served = []

    def spy(q, k, v, key_padding, num_heads):
        served.append(cpu_attention.kernel_serves(q, k, v, num_heads))
        return cpu_attention.chunk_attention(q, k, v, key_padding, num_heads)

    monkeypatch.setattr(pipeline, "chunk_attention", spy)
    monkeypatch.setenv("OMNISIFT_CPU_ATTENTION", choice)
    fast = compress(**kw, backend="cpu")
    assert served and all(s == (available and choice == "auto") for s in served), served
    n = near_tie_differences(fast.keep_mask, ref.keep_mask, ref.audio_scores, batch.inputs_embeds, batch.input_ids,
                             batch.position_ids, batch.attention_mask, video_token_id=batch.video_token_id,
                             audio_token_id=batch.audio_token_id, selector_dtype=torch.float32)
    assert n == 0
    assert_close_scores(fast.audio_scores, ref.audio_scores, torch.float32, "score")
