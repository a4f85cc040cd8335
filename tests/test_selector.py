"""The vision-guided audio selector (spec §4): size, release state dict, batched scoring, errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from omnisift_kernels import VisionGuidedAudioSelector
from omnisift_kernels.selector import count_parameters

RELEASE_SHAPES_3584 = {
    "v_proj.weight": (512, 3584),
    "v_proj.bias": (512,),
    "a_proj.weight": (512, 3584),
    "a_proj.bias": (512,),
    "v_norm.weight": (512,),
    "v_norm.bias": (512,),
    "a_norm.weight": (512,),
    "a_norm.bias": (512,),
    "cross_attn.in_proj_weight": (1536, 512),
    "cross_attn.in_proj_bias": (1536,),
    "cross_attn.out_proj.weight": (512, 512),
    "cross_attn.out_proj.bias": (512,),
    "post_attn_norm.weight": (512,),
    "post_attn_norm.bias": (512,),
    "score_head.0.weight": (256, 512),
    "score_head.0.bias": (256,),
    "score_head.2.weight": (1, 256),
    "score_head.2.bias": (1,),
}


@pytest.fixture(scope="module")
def big():
    with torch.device("meta"):  # shapes only, no memory, no init cost
        return VisionGuidedAudioSelector(3584)


def test_parameter_count_7b(big):
    # The authors' release (Qwen2.5-Omni-7B width d_model=3584, hidden 512, 8 heads): 4,856,321.
    assert count_parameters(big) == 4_856_321
    assert sum(p.numel() for p in big.parameters()) == 4_856_321


def test_parameter_count_real_construction_3b():
    # 3B width (d_model=2048), built for real (no forward). By hand:
    #   v_proj, a_proj: 2 * (2048*512 + 512)       = 2,098,176
    #   v_norm, a_norm, post_attn_norm: 3 * 2*512  =     3,072
    #   cross_attn in_proj: 1536*512 + 1536        =   787,968
    #   cross_attn out_proj: 512*512 + 512         =   262,656
    #   score_head: (256*512 + 256) + (256 + 1)    =   131,585
    #   total                                      = 3,283,457
    assert count_parameters(VisionGuidedAudioSelector(2048)) == 3_283_457


def test_parameter_count_small_config():
    # d_model=24, hidden 16, 4 heads, by hand:
    #   v_proj, a_proj: 2 * (24*16 + 16) = 800
    #   three LayerNorms: 3 * 2*16        =  96
    #   in_proj: 48*16 + 48               = 816
    #   out_proj: 16*16 + 16              = 272
    #   score_head: (8*16 + 8) + (8 + 1)  = 145
    #   total                             = 2,129
    assert count_parameters(VisionGuidedAudioSelector(24, num_heads=4, hidden_dim=16)) == 2_129


def test_release_state_dict_names_and_shapes(big):
    sd = big.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == RELEASE_SHAPES_3584
    assert isinstance(big.cross_attn, torch.nn.MultiheadAttention)
    assert big.cross_attn.num_heads == 8 and big.cross_attn.batch_first


def test_release_prefixed_checkpoint_loads():
    sel = VisionGuidedAudioSelector(32, num_heads=8, hidden_dim=32)
    ckpt = {f"thinker.compressor.{k}": torch.randn_like(v) for k, v in sel.state_dict().items()}
    sub = {k[len("thinker.compressor."):]: v for k, v in ckpt.items()}
    other = VisionGuidedAudioSelector(32, num_heads=8, hidden_dim=32)
    other.load_state_dict(sub, strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sub[k])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = VisionGuidedAudioSelector(24, num_heads=4, hidden_dim=16)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = VisionGuidedAudioSelector(24, num_heads=4, hidden_dim=16)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    audio, video = torch.randn(7, 24), torch.randn(5, 24)
    assert torch.equal(a(audio, video), b(audio, video))
    c = VisionGuidedAudioSelector(24, num_heads=4, hidden_dim=32)
    with pytest.raises(RuntimeError):
        c.load_state_dict(a.state_dict(), strict=True)
    bad = dict(a.state_dict())
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError):
        b.load_state_dict(bad, strict=True)


@pytest.fixture(scope="module")
def sel():
    torch.manual_seed(1)
    s = VisionGuidedAudioSelector(32, num_heads=8, hidden_dim=32)
    # Non-trivial norms/biases so that the test is not helped by the default init.
    with torch.no_grad():
        for n, p in s.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.3 * torch.randn_like(p))
    return s.eval()


def test_forward_range_dtype_shape(sel):
    audio, video = 3 * torch.randn(11, 32), torch.randn(4, 32)
    s = sel(audio, video)
    assert s.shape == (11,) and s.dtype == torch.float32
    assert ((s > 0) & (s < 1)).all()
    s16 = sel(audio.bfloat16(), video.half())  # any float dtype is cast to the parameters' dtype
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, s, atol=2e-2, rtol=0)


def test_forward_matches_manual_math(sel):
    audio, video = torch.randn(6, 32), torch.randn(3, 32)
    v = F.layer_norm(sel.v_proj(video), (32,), sel.v_norm.weight, sel.v_norm.bias)
    a = F.layer_norm(sel.a_proj(audio), (32,), sel.a_norm.weight, sel.a_norm.bias)
    h, _ = sel.cross_attn(a[None], v[None], v[None])
    x = F.layer_norm(h[0] + a, (32,), sel.post_attn_norm.weight, sel.post_attn_norm.bias)
    want = torch.sigmoid(sel.score_head[2](F.silu(sel.score_head[0](x)))).squeeze(-1)
    torch.testing.assert_close(sel(audio, video), want, atol=1e-6, rtol=0)


def test_forward_independent_of_video_order(sel):
    audio, video = torch.randn(5, 32), torch.randn(6, 32)
    perm = torch.randperm(6)
    torch.testing.assert_close(sel(audio, video), sel(audio, video[perm]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("sizes", [[(50, 99), (25, 33), (2, 1), (70, 5)], [(1, 1)], [(3, 7), (3, 7)]])
def test_score_chunks_equals_per_chunk_forward(sel, sizes):
    torch.manual_seed(len(sizes))
    C = len(sizes)
    La = max(a for a, _ in sizes)
    Lv = max(v for _, v in sizes)
    audio = torch.randn(C, La, 32)
    video = torch.randn(C, Lv, 32)
    mask = torch.ones(C, Lv, dtype=torch.bool)
    for c, (na, nv) in enumerate(sizes):
        mask[c, :nv] = False
        video[c, nv:] = 1e3 * torch.randn(Lv - nv, 32)  # garbage in the padding must not matter
    out = sel.score_chunks(audio, video, mask)
    assert out.shape == (C, La) and out.dtype == torch.float32
    for c, (na, nv) in enumerate(sizes):
        torch.testing.assert_close(out[c, :na], sel(audio[c, :na], video[c, :nv]), atol=1e-5, rtol=0)


def test_score_chunks_gradients_match(sel):
    audio = torch.randn(2, 5, 32)
    video = torch.randn(2, 4, 32)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    sel.zero_grad()
    sel.score_chunks(audio, video, mask).sum().backward()
    batched = {n: p.grad.clone() for n, p in sel.named_parameters()}
    sel.zero_grad()
    (sel(audio[0], video[0, :2]).sum() + sel(audio[1], video[1]).sum()).backward()
    for n, p in sel.named_parameters():
        torch.testing.assert_close(batched[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    sel.zero_grad()


def test_forward_errors(sel):
    with pytest.raises(ValueError, match="2-D"):
        sel(torch.randn(1, 4, 32), torch.randn(3, 32))
    with pytest.raises(ValueError, match="2-D"):
        sel(torch.randn(4, 32), torch.randn(32))
    with pytest.raises(ValueError, match="d_model=32"):
        sel(torch.randn(4, 16), torch.randn(3, 32))
    with pytest.raises(ValueError, match="video"):
        sel(torch.randn(4, 32), torch.randn(3, 31))
    with pytest.raises(ValueError, match="at least one"):
        sel(torch.randn(4, 32), torch.randn(0, 32))


def test_score_chunks_errors(sel):
    a, v = torch.randn(2, 4, 32), torch.randn(2, 3, 32)
    m = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="3-D"):
        sel.score_chunks(a[0], v, m)
    with pytest.raises(ValueError, match="d_model"):
        sel.score_chunks(a[..., :16], v, m)
    with pytest.raises(ValueError, match="video_padding_mask"):
        sel.score_chunks(a, v, m.int())
    with pytest.raises(ValueError, match="video_padding_mask"):
        sel.score_chunks(a, v, m[:, :2])


@pytest.mark.parametrize(
    "kwargs",
    [dict(d_model=0), dict(d_model=-4), dict(d_model=3.0), dict(d_model=32, hidden_dim=1),
     dict(d_model=32, num_heads=3), dict(d_model=32, num_heads=0), dict(d_model=32, hidden_dim=30, num_heads=8),
     dict(d_model=32, hidden_dim=32.0)],
)
def test_invalid_constructor_args(kwargs):
    with pytest.raises(ValueError, match="VisionGuidedAudioSelector"):
        VisionGuidedAudioSelector(**kwargs)


def test_defaults_and_repr():
    s = VisionGuidedAudioSelector(16)
    assert (s.d_model, s.num_heads, s.hidden_dim) == (16, 8, 512)
    assert "d_model=16" in repr(s)
    assert s.param_dtype == torch.float32
    assert s.half().param_dtype == torch.float16
