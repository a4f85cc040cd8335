"""pytest-benchmark suites of the OmniSIFT ops: video scores, segmented top-k, gather_ste, varlen_compact
and the selector's chunk attention (one or more cases per op of ``omnisift_kernels.ops``).

* On CUDA: Qwen2.5-Omni-7B-like shapes (D = 3584, bf16, 2 rows x 20 two-second chunks of two
  256-token frames + 50 audio tokens), Triton path vs the torch path.
* Elsewhere (CPU, incl. the Triton interpreter): tiny shapes so that ``--benchmark-disable`` runs
  in seconds; the Triton variants only under ``TRITON_INTERPRET=1`` (marked ``interpreter``).

Every case first checks the measured path against the readable references of
``omnisift_kernels.reference`` (never against another fast path): scores and attention outputs
within ``omnisift_kernels.testing.TOLERANCES``, masks exactly against ``reference.topk``'s Python
sort, gathers exactly against plain indexing. ``extra_info["bytes"]`` is the ideal HBM traffic of
the op, for a GB/s figure: ``bytes / median``.

    pytest bench/test_bench_ops.py --benchmark-only            # on a GPU machine
    TRITON_INTERPRET=1 pytest bench/test_bench_ops.py --benchmark-disable
"""

from __future__ import annotations

import os

import pytest
import torch

from omnisift_kernels.ops import chunk_attention as attention_ops
from omnisift_kernels.ops.gather import gather_rows_torch, gather_ste, gather_ste_backward_torch
from omnisift_kernels.ops.topk import segmented_topk_mask_torch
from omnisift_kernels.ops.varlen import varlen_compact
from omnisift_kernels.ops.video import (
    frame_pair_similarity_torch,
    frame_saliency_torch,
    video_scores_torch,
)
from omnisift_kernels.reference import chunk_attention as ref_attention
from omnisift_kernels.reference import gather as ref_gather
from omnisift_kernels.reference import topk as ref_topk
from omnisift_kernels.reference import varlen as ref_varlen
from omnisift_kernels.reference import video as ref_video
from omnisift_kernels.testing import assert_close_scores
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    from omnisift_kernels.triton_kernels import (
        frame_pair_similarity_triton,
        frame_saliency_triton,
        gather_rows_triton,
        gather_ste_backward_triton,
        segmented_topk_mask_triton,
        video_scores_triton,
    )

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SHAPE = dict(B=2, chunks=20, frame=256, audio=50, D=3584, dtype=torch.bfloat16)
else:
    SHAPE = dict(B=1, chunks=3, frame=8, audio=5, D=32, dtype=torch.float32)

_TRITON_RUNS = TRITON_AVAILABLE and (CUDA or os.environ.get("TRITON_INTERPRET", "0") == "1")
# bench/ has no conftest: skip the Triton variants here when Triton cannot run.
PATHS = ["torch", pytest.param("triton", marks=[
    pytest.mark.interpreter,
    pytest.mark.skipif(not _TRITON_RUNS, reason="needs Triton and TRITON_INTERPRET=1 or CUDA"),
])]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn):
    def timed():
        out = fn()
        _sync()
        return out

    return benchmark(timed)


class Workload:
    """Interleaved rows: per chunk, frame 1, frame 2, then the chunk's audio tokens."""

    def __init__(self, B, chunks, frame, audio, D, dtype):
        per_chunk = 2 * frame + audio
        L = chunks * per_chunk
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(B, L, D, generator=g).to(dtype).to(DEVICE)
        tok, off, pair, a_tok, a_off = [], [0], [], [], [0]
        for b in range(B):
            for c in range(chunks):
                t0 = b * L + c * per_chunk
                f1 = list(range(t0, t0 + frame))
                tok += f1 + list(range(t0 + frame, t0 + 2 * frame))
                pair += [-1] * frame + f1
                off += [off[-1] + frame, off[-1] + 2 * frame]
                a_tok += list(range(t0 + 2 * frame, t0 + per_chunk))
                a_off.append(a_off[-1] + audio)
        as_t = lambda v: torch.tensor(v, dtype=torch.int64, device=DEVICE)  # noqa: E731
        self.tok, self.off, self.pair = as_t(tok), as_t(off), as_t(pair)
        self.first = self.pair[self.pair >= 0]
        self.second = self.tok[self.pair >= 0]
        self.audio_tok, self.audio_off = as_t(a_tok), as_t(a_off)
        self.D, self.e = D, self.x.element_size()
        S = len(off) - 1
        self.k_video = torch.full((S,), int(frame * 0.67), dtype=torch.int64, device=DEVICE)
        self.k_audio = torch.full((len(a_off) - 1,), audio - int(audio * 0.4), dtype=torch.int64,
                                  device=DEVICE)
        g2 = torch.Generator().manual_seed(1)
        self.video_scores = torch.rand(len(tok), generator=g2).to(DEVICE)
        self.audio_scores = torch.rand(len(a_tok), generator=g2).to(DEVICE)
        self.scores_bl = torch.rand(B, L, generator=g2).to(DEVICE)
        keep = torch.rand(B * L, generator=g2) < 0.35
        self.keep_idx = torch.arange(B * L)[keep].to(DEVICE)
        self.keep = keep.view(B, L).to(DEVICE)
        self.position_ids = torch.arange(L).expand(3, B, L).contiguous().to(DEVICE)
        self.labels = torch.randint(0, 1000, (B, L), generator=g2).to(DEVICE)
        # The selector's chunk attention on this layout: per chunk, the audio queries against the
        # surviving video keys (two frames less the dropped ones), hidden 512 = 8 heads of 64.
        C, La, Lv, E = B * chunks, audio, 2 * (frame - int(frame * 0.67)), 512
        self.heads = 8
        self.q = torch.randn(C, La, E, generator=g2).to(dtype).to(DEVICE)
        kv = torch.randn(C, Lv, 2 * E, generator=g2).to(dtype).to(DEVICE)
        self.k, self.v = kv[..., :E], kv[..., E:]  # the halves of one projection, as the selector has them
        self.key_padding = torch.zeros(C, Lv, dtype=torch.bool, device=DEVICE)
        self.key_padding[::3, Lv // 2:] = True  # some chunks with fewer surviving keys
        self._ref = {}

    def ref(self, name, fn, *args):
        """``fn(*args)`` (a reference) computed once per workload."""
        if name not in self._ref:
            self._ref[name] = fn(*args)
        return self._ref[name]

    def grad_dot_scale(self, g):
        """``|x[b, l]| * |g[j]|`` for ``indices[j] = b*L + l`` (fp64): the scale of each grad_scores dot."""
        rows = self.x.flatten(0, 1)[self.keep_idx].double().cpu()
        return torch.linalg.vector_norm(rows, dim=-1) * torch.linalg.vector_norm(g.double().cpu(), dim=-1)


@pytest.fixture(scope="module")
def wl():
    return Workload(**SHAPE)


def _pick(path, triton_fn, torch_fn):
    return triton_fn if path == "triton" else torch_fn


def _reference_scores(wl):
    return wl.ref("video_scores", ref_video.video_scores, wl.x.cpu(), wl.tok.cpu(), wl.off.cpu(), wl.pair.cpu())


@pytest.mark.parametrize("path", PATHS)
def test_bench_video_scores_fused(benchmark, wl, path):
    fn = _pick(path, lambda: video_scores_triton(wl.x, wl.tok, wl.off, wl.pair),
               lambda: video_scores_torch(wl.x, wl.tok, wl.off, wl.pair))
    assert_close_scores(fn(), _reference_scores(wl), wl.x.dtype)
    n = wl.tok.numel()
    benchmark.extra_info["bytes"] = (n // 2 * 2 + n // 2) * wl.D * wl.e  # frame 1 x2, frame 2 x1
    _run(benchmark, fn)


@pytest.mark.parametrize("path", PATHS)
def test_bench_video_scores_unfused(benchmark, wl, path):
    """Saliency on all frames + pair similarity: the two separate ops (for the fusion gain)."""
    if path == "triton":
        def fn():
            sal = frame_saliency_triton(wl.x, wl.tok, wl.off)
            tmp = frame_pair_similarity_triton(wl.x, wl.first, wl.second)
            return sal, tmp
    else:
        def fn():
            return (frame_saliency_torch(wl.x, wl.tok, wl.off),
                    frame_pair_similarity_torch(wl.x, wl.first, wl.second))
    sal, tmp = fn()
    x = wl.x.cpu()
    assert_close_scores(sal, wl.ref("saliency", ref_video.frame_saliency, x, wl.tok.cpu(), wl.off.cpu()),
                        wl.x.dtype)
    assert_close_scores(tmp, wl.ref("pairs", ref_video.frame_pair_similarity, x, wl.first.cpu(), wl.second.cpu()),
                        wl.x.dtype)
    n = wl.tok.numel()
    benchmark.extra_info["bytes"] = (2 * n + n) * wl.D * wl.e
    _run(benchmark, fn)


@pytest.mark.parametrize("which", ["video", "audio"])
@pytest.mark.parametrize("path", PATHS)
def test_bench_segmented_topk(benchmark, wl, path, which):
    scores, off, k = ((wl.video_scores, wl.off, wl.k_video) if which == "video"
                      else (wl.audio_scores, wl.audio_off, wl.k_audio))
    fn = _pick(path, lambda: segmented_topk_mask_triton(scores, off, k),
               lambda: segmented_topk_mask_torch(scores, off, k))
    expected = wl.ref(f"topk {which}", ref_topk.segmented_topk_mask, scores.cpu(), off.cpu(), k.cpu())
    assert torch.equal(fn().cpu(), expected)
    benchmark.extra_info["bytes"] = scores.numel() * 5
    _run(benchmark, fn)


@pytest.mark.parametrize("path", PATHS)
def test_bench_gather_forward(benchmark, wl, path):
    fn = _pick(path, lambda: gather_rows_triton(wl.x, wl.keep_idx),
               lambda: gather_rows_torch(wl.x, wl.keep_idx))
    assert torch.equal(fn(), wl.x.flatten(0, 1)[wl.keep_idx])  # plain indexing, bit for bit
    benchmark.extra_info["bytes"] = 2 * wl.keep_idx.numel() * wl.D * wl.e
    _run(benchmark, fn)


def _check_gather_backward(gx, gs, wl, g):
    """``grad_x`` exactly and ``grad_scores`` within the fp32 'similarity' tolerance of
    ``reference.gather.gather_ste_backward`` (fp64). Each grad_scores element is a dot product of D
    terms, whose fp32 rounding is bounded relative to ``|x row| * |g row|``: the values are compared
    divided by that scale (gathered positions; zeros elsewhere, exactly)."""
    rx, rs = ref_gather.gather_ste_backward(g.cpu(), wl.x.cpu(), wl.keep_idx.cpu())
    assert torch.equal(gx.double().cpu(), rx)
    idx = wl.keep_idx.cpu()
    gs = gs.double().cpu().flatten()
    rs = rs.flatten()
    others = torch.ones_like(rs, dtype=torch.bool).index_fill_(0, idx, False)
    assert torch.equal(gs[others], rs[others])
    scale = wl.grad_dot_scale(g).clamp_min(1e-30)
    assert_close_scores(gs[idx] / scale, rs[idx] / scale, torch.float32, "similarity")


@pytest.mark.parametrize("path", PATHS)
def test_bench_gather_backward(benchmark, wl, path):
    g = torch.randn(wl.keep_idx.numel(), wl.D, device=DEVICE).to(wl.x.dtype)
    fn = _pick(path, lambda: gather_ste_backward_triton(g, wl.x, wl.keep_idx),
               lambda: gather_ste_backward_torch(g, wl.x, wl.keep_idx))
    gx, gs = fn()
    _check_gather_backward(gx, gs, wl, g)
    T = wl.keep_idx.numel()
    benchmark.extra_info["bytes"] = (3 * T + wl.x.shape[0] * wl.x.shape[1]) * wl.D * wl.e
    _run(benchmark, fn)


def test_bench_gather_ste_autograd(benchmark, wl):
    """The public op end to end (forward + backward through autograd), on the default path."""
    x = wl.x.detach().requires_grad_(True)
    s = wl.scores_bl.detach().requires_grad_(True)
    y = gather_ste(x, wl.keep_idx, s)
    assert torch.equal(y, wl.x.flatten(0, 1)[wl.keep_idx])
    y.float().sum().backward()
    ones = torch.ones(wl.keep_idx.numel(), wl.D, dtype=wl.x.dtype, device=DEVICE)  # d(sum)/dy
    _check_gather_backward(x.grad, s.grad, wl, ones)

    def fn():
        gather_ste(x, wl.keep_idx, s).float().sum().backward()

    _run(benchmark, fn)


def test_bench_varlen_compact(benchmark, wl):
    """Compaction of the kept tokens (packed rows, indices, cu_seqlens, positions, labels), exactly
    ``reference.varlen.varlen_compact`` (boolean indexing)."""
    def fn():
        return varlen_compact(wl.x, wl.keep, position_ids=wl.position_ids, labels=wl.labels)

    got = fn()
    want = ref_varlen.varlen_compact(wl.x, wl.keep, wl.position_ids, wl.labels)
    for name in ("packed", "indices", "cu_seqlens", "position_ids", "labels"):
        a, b = getattr(got, name), want[name]
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert int(got.max_seqlen) == want["max_seqlen"]
    T = wl.keep_idx.numel()
    benchmark.extra_info["bytes"] = 2 * T * wl.D * wl.e + wl.keep.numel() + T * (3 * 8 + 8 + 8)
    _run(benchmark, fn)


@pytest.mark.parametrize("impl", ["chunk_attention", "heads_attention"])
def test_bench_chunk_attention(benchmark, wl, impl, monkeypatch):
    """The selector's attention: ``ops.chunk_attention.chunk_attention`` (the CPU fast path's: the
    extension's AVX-512 kernel where it serves) and ``heads_attention`` (scaled_dot_product_attention),
    against the fp64 ``reference.chunk_attention``."""
    args = (wl.q, wl.k, wl.v, wl.key_padding, wl.heads)
    if impl == "chunk_attention":
        monkeypatch.delenv("OMNISIFT_CPU_ATTENTION", raising=False)
        if not attention_ops.kernel_serves(wl.q, wl.k, wl.v, wl.heads):
            pytest.skip("the extension's chunk attention kernel does not serve here (CPU tensors, the extension "
                        "and an AVX-512 CPU needed): chunk_attention would time heads_attention")
        fn = lambda: attention_ops.chunk_attention(*args)  # noqa: E731
    else:
        fn = lambda: attention_ops.heads_attention(*args)  # noqa: E731
    out = fn()
    assert out.dtype == wl.q.dtype
    kind = "similarity" if out.dtype == torch.float32 else "native"  # half precision: rounded output
    exact = wl.ref("attention", ref_attention.chunk_attention, *args)
    assert_close_scores(out, exact, wl.q.dtype, kind)
    C, La, E = wl.q.shape
    Lv = wl.k.shape[1]
    benchmark.extra_info["bytes"] = (2 * C * La * E + 2 * C * Lv * E) * wl.q.element_size()
    benchmark.extra_info["flops"] = 4 * C * La * Lv * E
    _run(benchmark, fn)


@pytest.mark.skipif(CUDA, reason="the CPU GEMM choice of the selector (omnisift_kernels.cpu_gemm)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemm", ["aten", "auto"])
def test_bench_selector_linear(benchmark, monkeypatch, gemm, dtype):
    """One selector projection, ``F.linear`` (``aten``) against the fast path's choice on this CPU
    (``auto``: oneDNN on AMD, half precision widened to fp32 GEMMs without AVX-512). The shape is
    above ``cpu_gemm.MIN_MACS`` so that the choice applies; the selector's real v_proj is
    [1980, 3584] x [3584, 512] (``python -m bench --op floor``)."""
    from omnisift_kernels import cpu_gemm
    from omnisift_kernels.testing import tolerance

    monkeypatch.setenv("OMNISIFT_CPU_GEMM", gemm)
    monkeypatch.setenv("OMNISIFT_CPU_HALF_GEMM", "auto")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 512, generator=g).to(dtype)
    w = (torch.randn(512, 512, generator=g) / 512 ** 0.5).to(dtype)
    b = torch.randn(512, generator=g).to(dtype)
    xin = x.float() if cpu_gemm.compute_dtype(dtype, x.device) == torch.float32 else x
    with torch.no_grad():
        out = cpu_gemm.linear(xin, w, b)
        atol, rtol = tolerance(dtype, "native")
        torch.testing.assert_close(out.double(), torch.nn.functional.linear(x.double(), w.double(), b.double()),
                                   atol=atol, rtol=rtol)
        benchmark.extra_info["flops"] = 2 * 1200 * 512 * 512
        _run(benchmark, lambda: cpu_gemm.linear(xin, w, b))
