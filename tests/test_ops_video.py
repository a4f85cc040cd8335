"""frame_saliency / frame_pair_similarity / video_scores: Triton (interpreter) and torch paths."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnisift_kernels.ops import frame_pair_similarity, frame_saliency, video_scores
from omnisift_kernels.ops.video import (
    frame_pair_similarity_torch,
    frame_saliency_torch,
    video_scores_torch,
)
from omnisift_kernels.testing import assert_close_scores, nan_poisoned, random_layout
from omnisift_kernels.reference.video import frame_pair_similarity as reference_pair_similarity
from omnisift_kernels.reference.video import frame_saliency as reference_frame_saliency
from omnisift_kernels.reference.video import video_scores as reference_video_scores
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    from omnisift_kernels.triton_kernels import (
        frame_pair_similarity_triton,
        frame_saliency_triton,
        video_scores_triton,
    )

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 5, 17, 64, 3, 0, 33, 1, 0]  # ragged, with empty and size-1 segments


def _chunks(B, L, n_per_frame, n_chunks, x_gen=None):
    """Two-frame chunks: frame 1 = saliency tokens, frame 2 = paired to frame 1 index-wise."""
    toks, offs, pairs = [], [0], []
    t = 0
    for _ in range(n_chunks):
        f1 = list(range(t, t + n_per_frame))
        f2 = list(range(t + n_per_frame, t + 2 * n_per_frame))
        toks += f1 + f2
        pairs += [-1] * n_per_frame + f1
        offs += [offs[-1] + n_per_frame, offs[-1] + 2 * n_per_frame]
        t += 2 * n_per_frame + 3
    assert t <= B * L
    return (torch.tensor(toks), torch.tensor(offs), torch.tensor(pairs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_frame_saliency_ragged(path, dtype, seed):
    B, L, D = 2, 120, 40
    x = torch.randn(B, L, D).to(dtype)
    tok, off = random_layout(B, L, SIZES, random.Random(seed))
    out = frame_saliency(x, tok, off)
    assert out.dtype == torch.float32 and out.shape == tok.shape
    expected = reference_frame_saliency(x, tok, off)
    assert_close_scores(out, expected, dtype)
    assert_close_scores(frame_saliency_torch(x, tok, off), expected, dtype)  # the fallback without the extension


@pytest.mark.parametrize("dtype", DTYPES)
def test_frame_pair_similarity(path, dtype, seed):
    B, L, D = 2, 50, 72
    x = torch.randn(B, L, D).to(dtype)
    first = torch.randint(0, B * L, (37,))
    second = torch.randint(0, B * L, (37,))
    out = frame_pair_similarity(x, first, second)
    expected = reference_pair_similarity(x, first, second)
    assert_close_scores(out, expected, dtype)
    assert_close_scores(frame_pair_similarity_torch(x, first, second), expected, dtype)  # the fallback


@pytest.mark.parametrize("dtype", DTYPES)
def test_video_scores_chunks(path, dtype, seed):
    B, L, D = 2, 64, 48
    x = torch.randn(B, L, D).to(dtype)
    tok, off, pair = _chunks(B, L, 9, 4)
    out = video_scores(x, tok, off, pair)
    assert_close_scores(out, reference_video_scores(x, tok, off, pair), dtype)
    # the two separate ops on the same tokens, against their references
    assert_close_scores(frame_saliency(x, tok, off), reference_frame_saliency(x, tok, off), dtype)
    first, second = pair.clamp_min(0), tok
    assert_close_scores(frame_pair_similarity(x, first, second), reference_pair_similarity(x, first, second), dtype)


def test_video_scores_irregular_pairs(path, seed):
    """Partners outside token_index, two tokens on one partner, chains, mixed segments."""
    B, L, D = 1, 40, 24
    x = torch.randn(B, L, D)
    tok = torch.tensor([0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 30])
    off = torch.tensor([0, 4, 8, 8, 11, 12])
    pair = torch.tensor([-1, -1, -1, -1,  # frame 1: saliency
                         0, 0, 35, 10,  # two on token 0; partner 35 not a token; chain
                         -1, 2, 11,  # mixed segment: saliency + temporal
                         -1])  # size-1 segment
    out = video_scores(x, tok, off, pair)
    assert_close_scores(out, reference_video_scores(x, tok, off, pair), torch.float32)


def test_zero_vectors_score_zero(path):
    B, L, D = 1, 12, 16
    x = torch.randn(B, L, D)
    x[0, 0] = 0  # a zero token in a normal segment
    x[0, 4:8] = 0  # a whole zero segment: zero mean
    tok = torch.arange(12)
    off = torch.tensor([0, 4, 8, 12])
    sal = frame_saliency(x, tok, off)
    assert not torch.isnan(sal).any()
    assert sal[0] == 0 and torch.all(sal[4:8] == 0)
    pairs = frame_pair_similarity(x, torch.tensor([0, 4, 9]), torch.tensor([1, 9, 9]))
    assert pairs[0] == 0 and pairs[1] == 0 and not torch.isnan(pairs).any()
    pair = torch.tensor([-1] * 8 + [0, 4, 1, -1])
    vs = video_scores(x, tok, off, pair)
    assert not torch.isnan(vs).any() and vs[8] == 0 and vs[9] == 0
    assert_close_scores(vs, reference_video_scores(x, tok, off, pair), torch.float32)


@pytest.mark.parametrize("view", ["transposed", "strided_d", "sliced_l"])
def test_non_contiguous(path, view, seed):
    B, L, D = 2, 30, 20
    if view == "transposed":  # strides (L*D, 1, L)
        x = torch.randn(B, D, L).transpose(1, 2)
    elif view == "strided_d":
        x = torch.randn(B, L, 2 * D)[:, :, ::2]
    else:
        x = torch.randn(B, 2 * L, D)[:, 5:5 + L]
    assert not x.is_contiguous()
    tok, off = random_layout(B, L, [7, 0, 12, 1, 9], random.Random(seed))
    pair = torch.full_like(tok, -1)
    pair[8:14] = tok[:6]
    assert_close_scores(frame_saliency(x, tok, off), reference_frame_saliency(x, tok, off),
                        torch.float32)
    assert_close_scores(frame_pair_similarity(x, tok[:6], tok[8:14]),
                        reference_pair_similarity(x, tok[:6], tok[8:14]), torch.float32)
    assert_close_scores(video_scores(x, tok, off, pair),
                        reference_video_scores(x, tok, off, pair), torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launchers_write_every_element(dtype, seed):
    """Launchers called with NaN-filled output buffers: no NaN may survive."""
    B, L, D = 2, 100, 36
    x = torch.randn(B, L, D).to(dtype)
    tok, off = random_layout(B, L, SIZES, random.Random(seed))
    N = tok.numel()
    out = frame_saliency_triton(x, tok, off, out=nan_poisoned(N))
    assert_close_scores(out, reference_frame_saliency(x, tok, off), dtype)
    out = frame_pair_similarity_triton(x, tok[:20], tok[-20:], out=nan_poisoned(20))
    assert_close_scores(out, reference_pair_similarity(x, tok[:20], tok[-20:]), dtype)
    tok, off, pair = _chunks(B, L, 7, 5)
    out = video_scores_triton(x, tok, off, pair, out=nan_poisoned(tok.numel()))
    assert_close_scores(out, reference_video_scores(x, tok, off, pair), dtype)


@pytest.mark.interpreter
def test_int64_addressing():
    """Rows beyond element 2^31 of the storage (a 4 GiB fp16 storage, untouched except the rows
    used: pages are never faulted in): the offsets b*stride_b must be computed in int64."""
    B, L, D = 2, 3, 8
    base = torch.empty(2**31 + 64, dtype=torch.float16)
    x = base.as_strided((B, L, D), (2**31, 16, 1))
    vals = torch.randn(B, L, D).half()
    x.copy_(vals)
    tok, off = torch.arange(6), torch.tensor([0, 3, 6])
    pair = torch.tensor([-1, -1, -1, 0, 1, 2])
    assert_close_scores(frame_saliency_triton(x, tok, off),
                        reference_frame_saliency(vals, tok, off), torch.float16)
    assert_close_scores(frame_pair_similarity_triton(x, tok[:3], tok[3:]),
                        reference_pair_similarity(vals, tok[:3], tok[3:]), torch.float16)
    assert_close_scores(video_scores_triton(x, tok, off, pair),
                        reference_video_scores(vals, tok, off, pair), torch.float16)


@st.composite
def _video_layouts(draw):
    B = draw(st.integers(1, 2))
    L = draw(st.integers(8, 48))
    D = draw(st.integers(1, 40))
    sizes = draw(st.lists(st.integers(0, 12), min_size=1, max_size=8))
    while sum(sizes) > B * L:
        sizes.pop()
    sizes = sizes or [0]
    pair_frac = draw(st.sampled_from([0.0, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return B, L, D, sizes, pair_frac, seed


@pytest.mark.interpreter
@settings(max_examples=15)
@given(_video_layouts())
def test_video_scores_random_layouts(layout):
    B, L, D, sizes, pair_frac, seed = layout
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    tok, off = random_layout(B, L, sizes, rng)
    pair = torch.tensor([rng.randrange(B * L) if rng.random() < pair_frac else -1
                         for _ in range(tok.numel())], dtype=torch.int64)
    expected = reference_video_scores(x, tok, off, pair)
    assert_close_scores(video_scores_triton(x, tok, off, pair, out=nan_poisoned(tok.numel())),
                        expected, torch.float32)
    assert_close_scores(video_scores_torch(x, tok, off, pair), expected, torch.float32)
    assert_close_scores(frame_saliency_triton(x, tok, off), reference_frame_saliency(x, tok, off),
                        torch.float32)


def test_empty_inputs(path):
    x = torch.randn(1, 4, 8)
    empty = torch.zeros(0, dtype=torch.int64)
    assert frame_saliency(x, empty, torch.zeros(1, dtype=torch.int64)).shape == (0,)
    assert frame_saliency(x, empty, torch.zeros(3, dtype=torch.int64)).shape == (0,)
    assert frame_pair_similarity(x, empty, empty).shape == (0,)
    assert video_scores(x, empty, torch.zeros(2, dtype=torch.int64), empty).shape == (0,)


def test_validation_errors():
    x = torch.randn(1, 4, 8)
    tok, off = torch.arange(4), torch.tensor([0, 4])
    with pytest.raises(TypeError, match="frame_saliency: x must be float32"):
        frame_saliency(x.int(), tok, off)
    with pytest.raises(ValueError, match=r"frame_saliency: x must be 3-D"):
        frame_saliency(x[0], tok, off)
    with pytest.raises(TypeError, match="frame_saliency: token_index must be int64, got torch.int32"):
        frame_saliency(x, tok.int(), off)
    with pytest.raises(ValueError, match="frame_saliency: seg_offsets must be 1-D"):
        frame_saliency(x, tok, off[None])
    with pytest.raises(ValueError, match="frame_saliency: seg_offsets must have length S\\+1 >= 1"):
        frame_saliency(x, tok, off[:0])
    with pytest.raises(ValueError, match="token_index must be on cpu .* got meta"):
        frame_saliency(x, tok.to("meta"), off)
    with pytest.raises(TypeError, match="frame_saliency: x must be a torch.Tensor"):
        frame_saliency(x.numpy(), tok, off)
    with pytest.raises(ValueError, match="second_index must have length 4"):
        frame_pair_similarity(x, tok, tok[:3])
    with pytest.raises(ValueError, match="video_scores: pair_index must have length 4"):
        video_scores(x, tok, off, tok[:2])


def test_opcheck():
    B, L, D = 2, 10, 12
    x = torch.randn(B, L, D)
    tok, off, pair = _chunks(B, L, 3, 2)
    torch.library.opcheck(torch.ops.omnisift.frame_saliency.default, (x, tok, off))
    torch.library.opcheck(torch.ops.omnisift.frame_pair_similarity.default,
                          (x, tok[:3], tok[3:6]))
    torch.library.opcheck(torch.ops.omnisift.video_scores.default, (x, tok, off, pair))


def test_torch_compile_fullgraph():
    B, L, D = 2, 10, 12
    x = torch.randn(B, L, D)
    tok, off, pair = _chunks(B, L, 3, 2)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(x, tok, off, pair):
        return (video_scores(x, tok, off, pair), frame_saliency(x, tok, off),
                frame_pair_similarity(x, tok[:3], tok[3:6]))

    vs, sal, ps = f(x, tok, off, pair)
    assert_close_scores(vs, reference_video_scores(x, tok, off, pair), torch.float32)
    assert_close_scores(sal, reference_frame_saliency(x, tok, off), torch.float32)
    assert_close_scores(ps, reference_pair_similarity(x, tok[:3], tok[3:6]), torch.float32)


def test_dispatch_rules(monkeypatch):
    import threading

    from omnisift_kernels.triton_kernels import triton_on_cpu, use_triton

    x = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with triton_on_cpu():
        assert not use_triton(x)  # CPU tensors need the interpreter too
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_triton(x)
    monkeypatch.setenv("OMNISIFT_TRITON_ON_CPU", "1")  # the environment plays no part
    assert not use_triton(x)
    with triton_on_cpu():
        assert use_triton(x) == TRITON_AVAILABLE
        seen = []
        t = threading.Thread(target=lambda: seen.append(use_triton(x)))  # another thread: not routed
        t.start()
        t.join()
        assert seen == [False]
        with triton_on_cpu(False):
            assert not use_triton(x)
        assert use_triton(x) == TRITON_AVAILABLE
    assert not use_triton(x)
    assert not use_triton(torch.zeros(1, device="meta"))


def test_works_without_triton():
    """With triton unimportable, the package imports and every op runs its torch path."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from omnisift_kernels import triton_kernels as tk\n"
        "from omnisift_kernels import ops\n"
        "assert not tk.TRITON_AVAILABLE and tk.TRITON_ERROR\n"
        "x = torch.randn(1, 6, 4); tok = torch.arange(6); off = torch.tensor([0, 3, 6])\n"
        "pair = torch.tensor([-1, -1, -1, 0, 1, 2])\n"
        "assert ops.frame_saliency(x, tok, off).shape == (6,)\n"
        "assert ops.video_scores(x, tok, off, pair).shape == (6,)\n"
        "assert ops.frame_pair_similarity(x, tok[:3], tok[3:]).shape == (3,)\n"
        "assert ops.segmented_topk_mask(torch.rand(6), off, torch.tensor([1, 2])).sum() == 3\n"
        "assert ops.gather_ste(x, tok[:2], torch.rand(1, 6)).shape == (2, 4)\n"
        "print('ok')\n"
    )
    env = dict(__import__("os").environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.interpreter
def test_gpu_tile_config_under_interpreter(monkeypatch, seed):
    """The GPU tile sizes (small BLOCK_T) give the same results as the interpreter's big tiles."""
    import omnisift_kernels.triton_kernels.video as tv

    monkeypatch.setattr(tv, "interpreting", lambda: False)
    B, L, D = 2, 64, 300  # D > 256: several feature slices
    x = torch.randn(B, L, D, dtype=torch.bfloat16)
    tok, off, pair = _chunks(B, L, 5, 3)
    assert_close_scores(frame_saliency_triton(x, tok, off), reference_frame_saliency(x, tok, off),
                        torch.bfloat16)
    assert_close_scores(video_scores_triton(x, tok, off, pair, out=nan_poisoned(tok.numel())),
                        reference_video_scores(x, tok, off, pair), torch.bfloat16)
