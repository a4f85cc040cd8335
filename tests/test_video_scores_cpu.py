"""The extension's C++ CPU kernels of the video scores (``omnisift::video_scores_cpu``) and of the fused
scores + drop set + row gather (``omnisift::video_keep_gather_cpu``) against the readable references:
``reference.video.video_scores`` (fp64) for the scores, ``reference.topk.segmented_topk_mask`` (a Python
sort) for the drop set, plain indexing for the rows."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from omnisift_kernels._ext import ext_has_kernel
from omnisift_kernels.ops import frame_pair_similarity, frame_saliency, video_scores
from omnisift_kernels.ops import video as video_ops
from omnisift_kernels.reference.topk import segmented_topk_mask as reference_topk_mask
from omnisift_kernels.reference.video import video_scores as reference_video_scores
from omnisift_kernels.testing import assert_close_scores, random_layout, set_cpu_env, tolerance

pytestmark = pytest.mark.skipif(
    not ext_has_kernel("video_scores_cpu", "CPU"), reason="the extension's CPU kernels are not built"
)


def _layout_with_pairs(B, L, sizes, seed):
    rng = random.Random(seed)
    tok, off = random_layout(B, L, sizes, rng)
    pair = torch.full_like(tok, -1)
    # Every second non-empty segment of the same size as the one before is paired index-wise.
    for s in range(1, len(sizes)):
        if sizes[s] == sizes[s - 1] and sizes[s] and s % 2 == 1:
            pair[off[s]:off[s + 1]] = tok[off[s - 1]:off[s]]
    return tok, off, pair


ISAS = ["base", "avx2", "avx512"]


@pytest.fixture(params=ISAS)
def cpu_isa(request, monkeypatch):
    """Caps the kernels' instruction set (read per call); machines without it run the best below."""
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
@pytest.mark.parametrize("D", [37, 1, 8, 16, 3584])
def test_cpp_kernel_matches_reference(dtype, layout, D, cpu_isa):
    # D covers the vector loops' tails: none (8, 16 and the Qwen2.5-Omni-7B width), scalar only (1),
    # 32/16/8-wide + scalar (37); every instruction set the machine has.
    g = torch.Generator().manual_seed(0)
    B, L = 3, 40
    base = torch.randn(B, L, 2 * D, generator=g).to(dtype)
    x = {"contiguous": base[:, :, :D].contiguous(), "sliced": base[:, :, ::2],
         "transposed": base[:, :, :D].transpose(0, 1).contiguous().transpose(0, 1)}[layout]
    tok, off, pair = _layout_with_pairs(B, L, [7, 7, 0, 1, 12, 12, 5, 3], seed=1)
    fast = torch.ops.omnisift.video_scores_cpu(x, tok, off, pair)
    assert_close_scores(fast, reference_video_scores(x, tok, off, pair), dtype)
    assert fast.dtype == torch.float32 and fast.shape == tok.shape


def test_public_ops_use_the_kernel_and_match_cosine_similarity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 64, generator=g)
    assert video_ops.cpu_kernel_serves(x)  # the public ops below run the C++ kernel
    tok, off, pair = _layout_with_pairs(2, 30, [10, 10, 4], seed=2)
    rows = x.reshape(-1, 64)
    expected = torch.empty(tok.shape[0])
    for s in range(off.shape[0] - 1):
        seg = tok[off[s]:off[s + 1]]
        if seg.numel():
            expected[off[s]:off[s + 1]] = F.cosine_similarity(rows[seg], rows[seg].mean(0, keepdim=True), dim=-1)
    assert_close_scores(frame_saliency(x, tok, off), expected, torch.float32)
    temporal = pair >= 0
    expected_v = expected.clone()
    expected_v[temporal] = F.cosine_similarity(rows[tok[temporal]], rows[pair[temporal]], dim=-1)
    assert_close_scores(video_scores(x, tok, off, pair), expected_v, torch.float32)
    assert_close_scores(frame_pair_similarity(x, pair[temporal], tok[temporal]), expected_v[temporal], torch.float32)


def test_zero_vectors_and_exact_ties():
    x = torch.zeros(1, 8, 16)
    x[0, 4] = 1.0
    x[0, 5] = 1.0  # duplicate of token 4: identical scores
    tok = torch.arange(8)
    off = torch.tensor([0, 4, 8])
    out = torch.ops.omnisift.video_scores_cpu(x, tok, off, torch.full_like(tok, -1))
    assert not out.isnan().any()
    assert torch.equal(out[:4], torch.zeros(4))
    assert out[4] == out[5]


def test_empty_inputs():
    x = torch.randn(1, 4, 8)
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.ops.omnisift.video_scores_cpu(x, empty, torch.zeros(1, dtype=torch.int64), empty).shape == (0,)


def _mixed_layout(B, L, D, seed):
    """Segments the kernel must not fuse: pairs into a later or an unrelated segment, partial pairing,
    a saliency segment followed by a same-size segment paired out of order, and a fusable pair."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B * L, generator=g)
    sizes = [6, 6, 5, 5, 4, 9, 6, 6]
    tok, off = [], [0]
    pos = 0
    for n in sizes:
        tok.append(torch.sort(perm[pos:pos + n]).values)
        pos += n
        off.append(pos)
    tok = torch.cat(tok)
    off = torch.tensor(off)
    pair = torch.full_like(tok, -1)
    seg = lambda s: slice(int(off[s]), int(off[s + 1]))  # noqa: E731
    pair[seg(1)] = tok[seg(0)].flip(0)            # same size, paired out of order: not fused
    pair[seg(2)][:3] = tok[seg(3)][:3]            # partly paired, to a later segment
    pair[seg(5)] = tok[torch.arange(9) % 6]       # paired into segment 0, mixed sizes
    pair[seg(7)] = tok[seg(6)]                    # the fusable case
    return torch.randn(B, L, D, generator=g), tok, off, pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unfusable_segments_match_reference(dtype, cpu_isa):
    x, tok, off, pair = _mixed_layout(2, 40, 67, seed=3)
    x = x.to(dtype)
    fast = torch.ops.omnisift.video_scores_cpu(x, tok, off, pair)
    assert_close_scores(fast, reference_video_scores(x, tok, off, pair), dtype)


def test_isa_cap_is_honoured(monkeypatch):
    best = torch.ops.omnisift.cpu_kernels_isa()
    assert best in ISAS
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_ISA", "base")
    assert torch.ops.omnisift.cpu_kernels_isa() == "base"
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_ISA", "avx2")
    assert torch.ops.omnisift.cpu_kernels_isa() in ("base", "avx2")
    set_cpu_env(monkeypatch, "OMNISIFT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="OMNISIFT_CPU_ISA"):
        torch.ops.omnisift.cpu_kernels_isa()


def test_parallel_regions_use_every_thread():
    """The module is built with OpenMP when torch is: at::parallel_for splits over torch's threads."""
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not use OpenMP here")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.omnisift.cpu_parallel_threads(1000) == 2
        torch.set_num_threads(1)
        assert torch.ops.omnisift.cpu_parallel_threads(1000) == 1
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_cpu(dtype, cpu_isa):
    from omnisift_kernels._validation import all_finite

    n = 3 * 65536 + 123  # several parallel ranges, several 8192-element blocks, a ragged tail
    x = torch.randn(n).to(dtype)
    assert bool(torch.ops.omnisift.all_finite_cpu(x)) and bool(all_finite(x))
    for where in (0, 8191, 8192, 65536 + 17, n - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[where] = bad
            assert not bool(torch.ops.omnisift.all_finite_cpu(y)), (where, bad)
            assert not bool(all_finite(y.view(1, -1, 1)))
    # Largest finite values and subnormals are finite; a non-contiguous view is checked as it is.
    big = torch.full((100,), torch.finfo(dtype).max, dtype=dtype)
    big[1::2] = torch.finfo(dtype).tiny / 2
    assert bool(torch.ops.omnisift.all_finite_cpu(big))
    base = torch.randn(64, 16).to(dtype)
    base[3, 1] = float("nan")
    assert bool(torch.ops.omnisift.all_finite_cpu(base[:, ::2]))        # the NaN is not in the view
    assert not bool(torch.ops.omnisift.all_finite_cpu(base[:, 1::2]))   # it is here
    assert bool(torch.ops.omnisift.all_finite_cpu(torch.arange(10)))    # integers are finite
    z = torch.zeros(5, dtype=torch.complex64)
    assert bool(torch.ops.omnisift.all_finite_cpu(z))
    z[2] = complex(0.0, float("inf"))
    assert not bool(torch.ops.omnisift.all_finite_cpu(z))               # complex: checked too
    if hasattr(torch, "float8_e5m2"):
        f8 = torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2)
        assert not bool(torch.ops.omnisift.all_finite_cpu(f8))
    assert torch.ops.omnisift.all_finite_cpu(x[:0]).dtype == torch.bool


def test_portable_loops_match_reference():
    """The kernel's portable (non-AVX2) loops, forced in a subprocess with OMNISIFT_CPU_BASELINE=1."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "import omnisift_kernels\n"
        "from omnisift_kernels.reference.video import video_scores as reference_video_scores\n"
        "from omnisift_kernels.testing import assert_close_scores\n"
        "g = torch.Generator().manual_seed(0)\n"
        "tok = torch.arange(0, 60, dtype=torch.long); off = torch.tensor([0, 20, 40, 60]); pair = torch.full_like(tok, -1)\n"
        "pair[20:40] = tok[:20]\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for D in (37, 3584):\n"
        "        x = torch.randn(2, 40, D, generator=g).to(dtype)\n"
        "        fast = torch.ops.omnisift.video_scores_cpu(x, tok, off, pair)\n"
        "        assert_close_scores(fast, reference_video_scores(x, tok, off, pair), dtype)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, OMNISIFT_CPU_BASELINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _check_keep_gather(keep, rows, x, tok, off, pair, drop, rows_fp32=False, exact=False, where=""):
    """Checks ``video_keep_gather_cpu``'s output against the references; returns the number of
    positions whose keep flag differs from the reference's (near ties only).

    Drop set: per segment the ``drop[s]`` tokens first in (score descending, position ascending), by
    ``reference.topk``'s Python sort of ``reference.video``'s fp64 scores rounded to fp32 (as every
    backend rounds them). NaN ranks highest (``ops.topk``'s documented order); cosines lie in
    [-1, 1], so +inf stands for NaN in the reference sort. A segment may differ from the reference
    only at a near tie: the same number dropped, and the lowest dropped reference score at least the
    highest kept one minus the ``"similarity"`` tolerance (``exact``: no difference allowed).
    Rows: plain indexing ``x.flatten(0, 1)[tok[keep]]`` of the kernel's kept tokens, bit for bit.
    """
    scores = reference_video_scores(x, tok, off, pair)  # float64
    ranked = torch.where(scores.isnan(), torch.full_like(scores, float("inf")), scores).float()
    ref_keep = ~reference_topk_mask(ranked, off, drop)
    assert keep.dtype == torch.bool and keep.shape == tok.shape, where
    if exact:
        assert torch.equal(keep, ref_keep), f"{where}: {keep.tolist()} != {ref_keep.tolist()}"
    atol, rtol = tolerance(x.dtype, "similarity")
    offs = off.tolist()
    for s in range(len(offs) - 1):
        a, b = offs[s], offs[s + 1]
        if torch.equal(keep[a:b], ref_keep[a:b]):
            continue
        dropped, seg = ~keep[a:b], scores[a:b]
        assert int(dropped.sum()) == int((~ref_keep[a:b]).sum()), f"{where} segment {s}: drop count"
        assert not seg.isnan().any(), f"{where} segment {s}: NaN ranks first, exactly"
        worst, best = float(seg[dropped].min()), float(seg[~dropped].max())
        assert worst >= best - (atol + rtol * abs(best)), (
            f"{where} segment {s}: drops a token scored {worst} over one scored {best} (beyond a near tie)")
    want = x.flatten(0, 1)[tok[keep]]
    want = want.float() if rows_fp32 else want
    assert rows.dtype == want.dtype and rows.shape == want.shape, where
    assert torch.equal(rows.isnan(), want.isnan()), where
    assert torch.equal(rows.nan_to_num(7.0), want.nan_to_num(7.0)), where
    return int((keep != ref_keep).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("rows_fp32", [False, True])
@pytest.mark.parametrize("D", [37, 2051])  # 2051: rows of 4 KiB+ (streaming stores, with a tail)
def test_keep_gather_matches_reference(dtype, layout, rows_fp32, D, cpu_isa):
    g = torch.Generator().manual_seed(2)
    B, L = 3, 40
    base = torch.randn(B, L, 2 * D, generator=g).to(dtype)
    x = base[:, :, :D].contiguous() if layout == "contiguous" else base[:, :, ::2]
    tok, off, pair = _layout_with_pairs(B, L, [7, 7, 0, 1, 12, 12, 5, 3], seed=1)
    sizes = off[1:] - off[:-1]
    drop = torch.tensor([3, 3, 0, 1, 5, 12, -1, 2])  # none (0, -1), one whole segment, one all-but-one
    drop = torch.minimum(drop, sizes)  # (a negative count drops nothing, as in segmented_topk_mask)
    keep, rows = torch.ops.omnisift.video_keep_gather_cpu(x, tok, off, pair, drop, rows_fp32=rows_fp32)
    assert rows.dtype == (torch.float32 if rows_fp32 else dtype)
    _check_keep_gather(keep, rows, x, tok, off, pair, drop, rows_fp32)


def test_keep_gather_exact_ties_drop_the_earlier_token():
    """Exact ties (identical tokens score identically everywhere): the earlier token is dropped first."""
    x = torch.zeros(1, 10, 4)
    x[0, :, 0] = 1.0
    x[0, 3, 1] = x[0, 7, 1] = 0.5       # two identical tokens, both below the rest (also all identical)
    tok = torch.arange(10)
    off = torch.tensor([0, 10])
    pair = torch.full_like(tok, -1)
    for k in range(0, 11):
        drop = torch.tensor([k])
        keep, rows = torch.ops.omnisift.video_keep_gather_cpu(x, tok, off, pair, drop)
        _check_keep_gather(keep, rows, x, tok, off, pair, drop, exact=True, where=f"k={k}")


def test_keep_gather_nan_ranks_highest():
    """A NaN row: its segment's mean is NaN (every saliency score NaN: dropped in position order), and
    the token paired with it scores NaN, dropped before every finite score of its segment."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 20, 4, generator=g)
    x[0, 5] = float("nan")
    tok = torch.arange(20)
    off = torch.tensor([0, 10, 20])
    pair = torch.cat([torch.full((10,), -1), tok[:10]])  # token 15 is paired with the NaN token 5
    for k in range(0, 11):
        drop = torch.tensor([k, k])
        keep, rows = torch.ops.omnisift.video_keep_gather_cpu(x, tok, off, pair, drop)
        _check_keep_gather(keep, rows, x, tok, off, pair, drop, exact=True, where=f"k={k}")


def test_keep_gather_checks_finiteness_and_arguments():
    x = torch.randn(1, 12, 8)
    tok = torch.arange(12)
    off = torch.tensor([0, 6, 12])
    pair = torch.full_like(tok, -1)
    drop = torch.tensor([2, 2])
    x[0, 9, 3] = float("inf")
    torch.ops.omnisift.video_keep_gather_cpu(x, tok, off, pair, drop)  # not asked to check
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.omnisift.video_keep_gather_cpu(x, tok, off, pair, drop, check_finite=True)
    with pytest.raises(ValueError, match="drop"):
        torch.ops.omnisift.video_keep_gather_cpu(x, tok, off, pair, torch.tensor([1]))
    with pytest.raises(TypeError, match="float32"):
        torch.ops.omnisift.video_keep_gather_cpu(x.double(), tok, off, pair, drop)
    keep, rows = torch.ops.omnisift.video_keep_gather_cpu(x, tok[:0], torch.tensor([0]), pair[:0],
                                                          torch.zeros(0, dtype=torch.int64))
    assert keep.shape == (0,) and rows.shape == (0, 8)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_units_split_over_threads(threads, dtype, cpu_isa):
    """One or two units (a short clip, one big segment): positions split over the threads, with the
    mean from per-thread partial sums; the scores within the tolerance of the reference, the drop set
    the reference's (near ties aside) and the rows plain indexing."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 300, 40, generator=g).to(dtype)
    tok = torch.arange(300)
    cases = {
        "one saliency segment": (torch.tensor([0, 300]), torch.full_like(tok, -1)),
        "one fused chunk": (torch.tensor([0, 150, 300]), torch.cat([torch.full((150,), -1), tok[:150]])),
        "pairs only": (torch.tensor([0, 300]), torch.flip(tok, [0])),
    }
    old = torch.get_num_threads()
    try:
        for name, (off, pair) in cases.items():
            torch.set_num_threads(threads)
            got = torch.ops.omnisift.video_scores_cpu(x, tok, off, pair)
            assert_close_scores(got, reference_video_scores(x, tok, off, pair), dtype, msg=name)
            drop = (off[1:] - off[:-1]) // 3
            keep, rows = torch.ops.omnisift.video_keep_gather_cpu(x, tok, off, pair, drop)
            _check_keep_gather(keep, rows, x, tok, off, pair, drop, where=name)
    finally:
        torch.set_num_threads(old)


def test_bad_indices_raise_instead_of_reading_out_of_bounds():
    x = torch.randn(1, 8, 4)
    one = torch.full((2,), -1)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.omnisift.video_scores_cpu(x, torch.tensor([0, 10**9]), torch.tensor([0, 2]), one)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.omnisift.video_scores_cpu(x, torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([-1, 8]))
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.omnisift.video_scores_cpu(x, torch.arange(3), torch.tensor([0, 2, 1, 3]), torch.full((3,), -1))
    with pytest.raises(ValueError, match="outside"):
        torch.ops.omnisift.video_scores_cpu(torch.randn(1, 0, 4), torch.tensor([0]), torch.tensor([0, 1]),
                                            torch.tensor([-1]))
