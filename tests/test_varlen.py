"""Variable-length compaction (omnisift_kernels.ops.varlen): exact equality with plain PyTorch.

Every test runs on both backends where available: the compiled extension (``omnisift::varlen_*`` C++
ops) and the pure-PyTorch fallback (forced through ``varlen.FORCE_FALLBACK``).
"""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels import _ext
from omnisift_kernels.ops import varlen as V
from omnisift_kernels.reference.varlen import varlen_compact as ref_compact
from omnisift_kernels.reference.varlen import varlen_gather as ref_gather
from omnisift_kernels.reference.varlen import varlen_pad as ref_pad
from omnisift_kernels.reference.varlen import varlen_scatter as ref_scatter

HAS_EXT_CPU = _ext.ext_has_kernel("varlen_compact", "CPU")
BACKENDS = [
    pytest.param("ext", marks=pytest.mark.skipif(not HAS_EXT_CPU, reason="extension without CPU kernels")),
    "fallback",
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(V, "FORCE_FALLBACK", request.param == "fallback")
    return request.param


def make_keep(kind, B, L, gen):
    if kind == "random":
        return torch.rand(B, L, generator=gen) > 0.45
    if kind == "all":
        return torch.ones(B, L, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(B, L, dtype=torch.bool)
    if kind == "empty_rows":  # every other row empty
        keep = torch.rand(B, L, generator=gen) > 0.3
        keep[::2] = False
        return keep
    raise AssertionError(kind)


def make_x(B, L, D, dtype, gen):
    return torch.randn(B, L, D, generator=gen).to(dtype)


def check_packed(res, ref):
    assert torch.equal(res.packed, ref["packed"])
    assert res.packed.dtype == ref["packed"].dtype
    assert torch.equal(res.indices, ref["indices"]) and res.indices.dtype == torch.int64
    assert torch.equal(res.cu_seqlens, ref["cu_seqlens"]) and res.cu_seqlens.dtype == torch.int32
    assert int(res.max_seqlen) == ref["max_seqlen"]
    for name in ("position_ids", "labels"):
        if name in ref:
            got = getattr(res, name)
            assert got.dtype == ref[name].dtype and torch.equal(got, ref[name]), name
        else:
            assert getattr(res, name) is None


# ------------------------------------------------------------------------------------------------
# varlen_compact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,kind",
    [
        ((3, 17, 8), "random"),
        ((4, 9, 6), "empty_rows"),
        ((2, 5, 3), "all"),
        ((3, 6, 4), "none"),
        ((1, 13, 5), "random"),
        ((3, 11, 1), "random"),
        ((2, 7, 33), "random"),
        ((2, 6, 4099), "random"),
    ],
)
def test_compact_matches_torch(backend, dtype, shape, kind):
    gen = torch.Generator().manual_seed(hash((shape, kind)) % 2**31)
    B, L, D = shape
    x = make_x(B, L, D, dtype, gen)
    keep = make_keep(kind, B, L, gen)
    pos = torch.randint(0, 1000, (3, B, L), generator=gen)
    labels = torch.randint(-100, 50000, (B, L), generator=gen)
    res = V.varlen_compact(x, keep, position_ids=pos, labels=labels)
    assert isinstance(res.max_seqlen, int)
    check_packed(res, ref_compact(x, keep, pos, labels))
    # no side tensors
    check_packed(V.varlen_compact(x, keep), ref_compact(x, keep))


@pytest.mark.parametrize("pos_dtype,label_dtype", [(torch.int32, torch.int16), (torch.int64, torch.int8),
                                                    (torch.float32, torch.int64)])
def test_compact_side_tensor_dtypes(backend, pos_dtype, label_dtype):
    gen = torch.Generator().manual_seed(3)
    B, L, D = 3, 10, 4
    x = make_x(B, L, D, torch.float64, gen)
    keep = make_keep("random", B, L, gen)
    pos = torch.randint(-5, 100, (3, B, L), generator=gen).to(pos_dtype)
    labels = torch.randint(-100, 100, (B, L), generator=gen).to(label_dtype)
    check_packed(V.varlen_compact(x, keep, position_ids=pos, labels=labels), ref_compact(x, keep, pos, labels))
    # [B, L] position ids (1-D rope) -> [T]
    res = V.varlen_compact(x, keep, position_ids=pos[0])
    assert torch.equal(res.position_ids, pos[0][keep])
    # integer payload
    xi = torch.randint(0, 2**40, (B, L, 3), generator=gen)
    assert torch.equal(V.varlen_compact(xi, keep).packed, xi[keep])


def test_compact_noncontiguous(backend):
    gen = torch.Generator().manual_seed(5)
    B, L, D = 3, 12, 10
    base = torch.randn(L, B, 2 * D, generator=gen)
    views = {
        "transposed": base[..., :D].transpose(0, 1),  # [B, L, D], stride(2) == 1
        "strided_d": base.transpose(0, 1)[..., ::2],  # stride(2) == 2
        "sliced_l": torch.randn(B, 2 * L, D, generator=gen)[:, 1::2],
    }
    keep = (torch.rand(L, B, generator=gen) > 0.5).t()  # non-contiguous keep
    pos = torch.randint(0, 99, (B, L, 3), generator=gen).permute(2, 0, 1)  # non-contiguous [3, B, L]
    labels = torch.randint(0, 99, (L, B), generator=gen).t()
    for name, x in views.items():
        assert not x.is_contiguous(), name
        res = V.varlen_compact(x, keep, position_ids=pos, labels=labels)
        check_packed(res, ref_compact(x, keep, pos, labels))


def test_compact_empty_batch_and_seq(backend):
    for B, L in [(0, 5), (3, 0)]:
        x = torch.randn(B, L, 4)
        keep = torch.zeros(B, L, dtype=torch.bool)
        res = V.varlen_compact(x, keep, labels=torch.zeros(B, L, dtype=torch.int64))
        assert res.packed.shape == (0, 4) and res.indices.shape == (0,) and res.labels.shape == (0,)
        assert res.cu_seqlens.tolist() == [0] * (B + 1) and res.max_seqlen == 0


def test_compact_with_total(backend):
    gen = torch.Generator().manual_seed(7)
    x = make_x(4, 9, 5, torch.float32, gen)
    keep = make_keep("empty_rows", 4, 9, gen)
    labels = torch.randint(0, 9, (4, 9), generator=gen)
    T = int(keep.sum())
    res = V.varlen_compact(x, keep, labels=labels, total=T)
    ref = ref_compact(x, keep, labels=labels)
    assert isinstance(res.max_seqlen, torch.Tensor) and res.max_seqlen.dim() == 0
    check_packed(res, ref)
    with pytest.raises(ValueError, match=r"varlen_compact: total=%d but keep has %d" % (T + 1, T)):
        V.varlen_compact(x, keep, total=T + 1)
    with pytest.raises(ValueError, match="varlen_compact: total must be <= B\\*L = 36, got 37"):
        V.varlen_compact(x, keep, total=37)
    with pytest.raises(TypeError, match="varlen_compact: total must be an int, got float"):
        V.varlen_compact(x, keep, total=3.0)


# ------------------------------------------------------------------------------------------------
# varlen_pad / varlen_scatter / varlen_gather


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pad_matches_reference(backend, side, dtype):
    gen = torch.Generator().manual_seed(11)
    B, L, D = 4, 10, 6
    x = make_x(B, L, D, dtype, gen)
    keep = make_keep("random", B, L, gen)
    keep[2] = False
    pos = torch.randint(0, 50, (3, B, L), generator=gen)
    labels = torch.randint(0, 50, (B, L), generator=gen)
    res = V.varlen_pad(x, keep, side=side, position_ids=pos, labels=labels, pad_value=-1.5, position_pad=1)
    padded, mask, rpos, rlab, W = ref_pad(x, keep, side, -1.5, pos, 1, labels, -100)
    assert res.max_seqlen == W and isinstance(res.max_seqlen, int)
    assert torch.equal(res.padded, padded) and res.padded.dtype == dtype
    assert torch.equal(res.attention_mask, mask) and res.attention_mask.dtype == torch.int64
    assert torch.equal(res.position_ids, rpos) and torch.equal(res.labels, rlab)
    ref = ref_compact(x, keep)
    assert torch.equal(res.indices, ref["indices"]) and torch.equal(res.cu_seqlens, ref["cu_seqlens"])
    assert torch.equal(res.padded.flatten(0, 1)[res.pad_indices], ref["packed"])
    # sync-free variant (total and max_seqlen host-known) gives the same
    res2 = V.varlen_pad(x, keep, side=side, position_ids=pos[0], total=int(keep.sum()), max_seqlen=W)
    assert torch.equal(res2.padded, res.padded.to(torch.float32).to(dtype).clone().masked_fill(
        res.attention_mask[..., None] == 0, 0.0))
    assert torch.equal(res2.position_ids, ref_pad(x, keep, side, 0.0, pos[0])[2])
    assert res2.labels is None
    with pytest.raises(ValueError, match=f"varlen_pad: max_seqlen={W + 1} but the longest kept row has {W}"):
        V.varlen_pad(x, keep, max_seqlen=W + 1)
    with pytest.raises(ValueError, match="varlen_pad: side must be 'right' or 'left', got 'top'"):
        V.varlen_pad(x, keep, side="top")


@pytest.mark.parametrize("D", [1, 7, 64])
def test_scatter_inverse(backend, D):
    gen = torch.Generator().manual_seed(D)
    B, L = 3, 8
    x = make_x(B, L, D, torch.float16, gen)
    keep = make_keep("random", B, L, gen)
    res = V.varlen_compact(x, keep)
    out = V.varlen_scatter(res.packed, res.indices, B, L, fill=2.5)
    assert torch.equal(out, ref_scatter(res.packed, res.indices, B, L, fill=2.5))
    assert torch.equal(out, torch.where(keep[..., None], x, torch.tensor(2.5, dtype=x.dtype)))
    # non-contiguous packed
    wide = torch.zeros(res.packed.shape[0], 2 * D, dtype=x.dtype)
    wide[:, ::2] = res.packed
    for packed_nc in (wide[:, ::2], torch.cat([res.packed, res.packed], 1)[:, :D]):
        assert not packed_nc.is_contiguous() or D == 1
        assert torch.equal(V.varlen_scatter(packed_nc, res.indices, B, L), torch.where(keep[..., None], x, 0))
    # gather = inverse of scatter
    assert torch.equal(V.varlen_gather(out.flatten(0, 1), res.indices), res.packed)


def test_gather_scatter_out_of_range_indices(backend):
    src = torch.arange(12.0).view(4, 3)
    idx = torch.tensor([2, -1, 4, 0])
    assert torch.equal(V.varlen_gather(src, idx), torch.tensor([[6.0, 7, 8], [0, 0, 0], [0, 0, 0], [0, 1, 2]]))
    assert torch.equal(V.varlen_gather(src, idx), ref_gather(src, idx))
    out = V.varlen_scatter(src, idx, 1, 3, fill=-1.0)
    assert torch.equal(out, ref_scatter(src, idx, 1, 3, fill=-1.0))
    assert torch.equal(out[0], torch.tensor([[9.0, 10, 11], [-1, -1, -1], [0, 1, 2]]))


# ------------------------------------------------------------------------------------------------
# Autograd


def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    keep = make_keep("random", 3, 5, gen)
    keep[1] = False
    torch.autograd.gradcheck(lambda t: V.varlen_compact(t, keep).packed, (x,))
    torch.autograd.gradcheck(lambda t: V.varlen_compact(t, keep, total=int(keep.sum())).packed, (x,))
    torch.autograd.gradcheck(lambda t: V.varlen_pad(t, keep, side="left", pad_value=1.0).padded, (x,))
    idx = keep.flatten().nonzero().flatten()
    packed = torch.randn(idx.numel(), 4, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda p: V.varlen_scatter(p, idx, 3, 5, fill=3.0), (packed,))
    src = torch.randn(15, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.autograd.gradcheck(lambda s: V.varlen_gather(s, idx), (src,))
    # dropped rows get zero gradient
    V.varlen_compact(x, keep).packed.sum().backward()
    assert torch.equal(x.grad, keep[..., None].expand_as(x).to(torch.float64))


# ------------------------------------------------------------------------------------------------
# Errors


def test_errors():
    x = torch.randn(2, 5, 3)
    keep = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="varlen_compact: keep must be a bool tensor, got torch.int64"):
        V.varlen_compact(x, keep.long())
    with pytest.raises(TypeError, match="varlen_compact: x must be a torch.Tensor, got list"):
        V.varlen_compact([1, 2], keep)
    with pytest.raises(ValueError, match=r"varlen_compact: x must be 3-D \[B, L, D\], got shape \(2, 5\)"):
        V.varlen_compact(x[..., 0], keep)
    with pytest.raises(ValueError, match=r"varlen_compact: keep must have shape \[B, L\] = \[2, 5\], got \[2, 4\]"):
        V.varlen_compact(x, keep[:, :4])
    with pytest.raises(ValueError, match="varlen_compact: keep is on meta but x is on cpu"):
        V.varlen_compact(x, keep.to("meta"))
    with pytest.raises(ValueError, match=r"varlen_compact: position_ids must have shape \[3, B, L\].*got \[3, 2, 4\]"):
        V.varlen_compact(x, keep, position_ids=torch.zeros(3, 2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"varlen_compact: labels must have shape \[B, L\] = \[2, 5\], got \[5, 2\]"):
        V.varlen_compact(x, keep, labels=torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="varlen_pad: labels is on meta but x is on cpu"):
        V.varlen_pad(x, keep, labels=torch.zeros(2, 5, dtype=torch.int64, device="meta"))
    packed, idx = torch.randn(4, 3), torch.arange(4)
    with pytest.raises(TypeError, match="varlen_scatter: indices must be int64, got torch.int32"):
        V.varlen_scatter(packed, idx.int(), 2, 5)
    with pytest.raises(ValueError, match=r"varlen_scatter: indices must have shape \[T\] = \[4\], got \[3\]"):
        V.varlen_scatter(packed, idx[:3], 2, 5)
    with pytest.raises(ValueError, match=r"varlen_scatter: packed must be 2-D \[T, D\], got shape \(4,\)"):
        V.varlen_scatter(packed[:, 0], idx, 2, 5)
    with pytest.raises(ValueError, match="varlen_scatter: batch must be >= 0, got -1"):
        V.varlen_scatter(packed, idx, -1, 5)
    with pytest.raises(TypeError, match="varlen_scatter: seqlen must be an int, got float"):
        V.varlen_scatter(packed, idx, 2, 5.0)
    with pytest.raises(ValueError, match="varlen_gather: indices is on meta but src is on cpu"):
        V.varlen_gather(packed, idx.to("meta"))


@pytest.mark.skipif(not HAS_EXT_CPU, reason="extension without CPU kernels")
def test_cpp_op_errors():
    x = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="varlen_compact: keep must be bool"):
        torch.ops.omnisift.varlen_compact(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="varlen_compact: total=3 but keep has 10"):
        torch.ops.omnisift.varlen_compact(x, torch.ones(2, 5, dtype=torch.bool), None, None, 3)
    with pytest.raises(ValueError, match="varlen_scatter: packed has 3 rows but indices has 4"):
        torch.ops.omnisift.varlen_scatter(x[0, :3], torch.arange(4), 2, 5, 0.0)


# ------------------------------------------------------------------------------------------------
# Extension vs fallback, opcheck, torch.compile


@pytest.mark.skipif(not HAS_EXT_CPU, reason="extension without CPU kernels")
def test_fallback_equals_extension(monkeypatch):
    gen = torch.Generator().manual_seed(17)
    x = make_x(5, 33, 19, torch.bfloat16, gen)
    keep = make_keep("empty_rows", 5, 33, gen)
    pos = torch.randint(0, 99, (3, 5, 33), generator=gen)
    labels = torch.randint(0, 99, (5, 33), generator=gen)
    outs = {}
    for fb in (False, True):
        monkeypatch.setattr(V, "FORCE_FALLBACK", fb)
        c = V.varlen_compact(x, keep, position_ids=pos, labels=labels)
        p = V.varlen_pad(x, keep, side="left", position_ids=pos, labels=labels)
        s = V.varlen_scatter(c.packed, c.indices, 5, 33, fill=1.0)
        outs[fb] = (*c, *p, s)
    for a, b in zip(outs[False], outs[True]):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b


def _opcheck_cases():
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(3, 6, 4, generator=gen)
    keep = torch.rand(3, 6, generator=gen) > 0.5
    pos = torch.randint(0, 9, (3, 3, 6), generator=gen)
    labels = torch.randint(0, 9, (3, 6), generator=gen)
    idx = keep.flatten().nonzero().flatten()
    T = idx.numel()
    packed = torch.randn(T, 4, generator=gen)
    xg = x.clone().requires_grad_(True)
    return [
        ("varlen_compact_op", V._compact_op, (x, keep, pos, labels, None)),
        ("varlen_compact_op_total", V._compact_op, (x, keep, None, labels, T)),
        ("varlen_compact_op_grad", V._compact_op, (xg, keep, pos[0], None, None)),
        ("varlen_scatter_op", V._scatter_op, (packed.requires_grad_(True), idx, 3, 6, 0.5)),
        ("varlen_gather_op", V._gather_op, (x.flatten(0, 1).requires_grad_(True), idx)),
        ("cpp_varlen_compact", "varlen_compact", (x, keep, pos, labels, None)),
        ("cpp_varlen_compact_total", "varlen_compact", (x, keep, None, None, T)),
        ("cpp_varlen_scatter", "varlen_scatter", (packed.detach(), idx, 3, 6, 0.0)),
        ("cpp_varlen_gather", "varlen_gather", (x.flatten(0, 1), idx)),
    ]


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    name, op, args = case
    if isinstance(op, str):
        if not HAS_EXT_CPU:
            pytest.skip("extension without CPU kernels")
        op = getattr(torch.ops.omnisift, op).default
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(23)
    B, L, D = 3, 16, 8
    x = torch.randn(B, L, D, generator=gen)
    keep = torch.rand(B, L, generator=gen) > 0.5
    pos = torch.randint(0, 99, (3, B, L), generator=gen)
    labels = torch.randint(0, 99, (B, L), generator=gen)
    T = int(keep.sum())

    def f(x, keep, pos, labels, total=None):
        r = V.varlen_compact(x, keep, position_ids=pos, labels=labels, total=total)
        back = V.varlen_scatter(r.packed * 2, r.indices, B, L)
        return r.packed, r.indices, r.cu_seqlens, r.position_ids, r.labels, back

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    ref = ref_compact(x, keep, pos, labels)
    for total in (None, T):
        packed, indices, cu, p, lab, back = compiled(x, keep, pos, labels, total)
        assert torch.equal(packed, ref["packed"]) and torch.equal(indices, ref["indices"])
        assert torch.equal(cu, ref["cu_seqlens"]) and torch.equal(p, ref["position_ids"])
        assert torch.equal(lab, ref["labels"])
        assert torch.equal(back, torch.where(keep[..., None], 2 * x, 0))


@pytest.mark.skipif(not _ext.ext_has_kernel("varlen_gather", "CPU"), reason="needs the extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [1024, 1030, 2051, 4096])  # rows of 4 KiB and more: streaming stores,
def test_long_rows_copied_exactly(dtype, D):            # tails of 8-56 bytes, unaligned later rows
    """Rows of 4 KiB or more are copied with non-temporal stores where the destination is 16-byte
    aligned (csrc/cpu_alloc.h): every byte of every row, tails and unaligned rows included."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(3, 40, D, generator=g).to(dtype)
    keep = torch.rand(3, 40, generator=g) < 0.6
    flat = x.flatten(0, 1)
    idx = torch.randperm(120, generator=g)[:77]
    assert torch.equal(torch.ops.omnisift.varlen_gather(flat, idx), ref_gather(flat, idx))
    packed = torch.ops.omnisift.varlen_compact(x, keep)[0]
    assert torch.equal(packed, flat[keep.flatten()])
    # The fused video kernel's survivor rows take the same copy: checked against x in
    # tests/test_video_scores_cpu.py and end to end in tests/test_pipeline.py.
