"""The batched fast path (backend "cpu", and "triton" under the interpreter) against the reference."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnisift_kernels import (
    PRESETS,
    OmniSIFTCompressor,
    SpatioTemporalVideoPruner,
    VisionGuidedAudioSelector,
    compress,
)
from omnisift_kernels.api import resolve_backend
from omnisift_kernels.layout import Audio, Image, Text, Video
from omnisift_kernels._ext import ext_has_kernel
from omnisift_kernels.pipeline import compact_indices, keep_gather_serves
from omnisift_kernels.plan import build_plan, read_sizes
from omnisift_kernels.sync_guard import HostSyncError, forbid_host_sync
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.testing import tolerance

D = 16
torch.manual_seed(0)
SELECTOR = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).eval()

EXACT_FIELDS = (
    "keep_mask", "inputs_embeds", "position_ids", "attention_mask", "labels", "indices",
    "cu_seqlens", "rope_deltas", "video_kept", "video_total", "audio_kept", "audio_total",
)


def assert_same_result(ref, fast):
    """Everything but the selector scores is exact (compared on the CPU, so ``fast`` may live on
    another device); scores within fp32 noise."""
    for name in EXACT_FIELDS:
        a, b = getattr(ref, name), getattr(fast, name)
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        a, b = a.cpu(), b.cpu()
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert torch.equal(a, b), f"{name} differs"
    assert ref.max_seqlen == fast.max_seqlen
    if ref.audio_scores is not None:
        torch.testing.assert_close(fast.audio_scores.cpu(), ref.audio_scores.cpu(), rtol=1e-4, atol=1e-5)


def run_both(batch, selector, rho_video, rho_audio, output="packed", grid=False, backend="cpu"):
    kw = batch.compress_kwargs()
    common = dict(rho_video=rho_video, rho_audio=rho_audio, selector=selector, output=output)
    with torch.no_grad():
        ref = compress(**kw, **common, backend="reference")
        fast = compress(**kw, **common, backend=backend, grid=batch.rows if grid else None)
    return ref, fast


# ------------------------------------------------------------------------------------------------
# Random layouts.

videos = st.builds(
    Video,
    seconds=st.integers(1, 5),
    frame_h=st.integers(1, 3),
    frame_w=st.integers(1, 4),
    audio_tokens=st.one_of(st.none(), st.just(0), st.integers(1, 140)),
)
media = st.one_of(videos, videos, st.builds(Audio, st.integers(1, 60)), st.builds(Image, st.integers(1, 2), st.integers(1, 3)))
rows = st.builds(
    lambda pre, items, post: [Text(pre), *items, Text(post)],
    st.integers(0, 6), st.lists(media, min_size=0, max_size=3), st.integers(0, 6),
)
ratios = st.one_of(
    st.sampled_from([(p.rho_video, p.rho_audio) for p in PRESETS.values()]),
    st.tuples(st.floats(0, 0.95), st.floats(0, 0.95)),
)


def _layout_test(max_examples):
    return settings(max_examples=max_examples)(
        given(
            layout=st.lists(rows, min_size=1, max_size=3),
            rho=ratios,
            dtype=st.sampled_from([torch.float32, torch.bfloat16]),
            output=st.sampled_from(["packed", "right", "left"]),
            use_grid=st.booleans(),
            with_selector=st.booleans(),
            seed=st.integers(0, 2**16),
        )(_check_layout)
    )


def _check_layout(layout, rho, dtype, output, use_grid, with_selector, seed):
    batch = make_batch(layout, D, dtype=dtype, seed=seed)
    ref, fast = run_both(batch, SELECTOR if with_selector else None, *rho, output=output, grid=use_grid)
    assert_same_result(ref, fast)


test_random_layouts_match_reference = _layout_test(60)
test_random_layouts_match_reference_many = pytest.mark.slow(_layout_test(400))


@pytest.mark.parametrize("preset", ["paper-35", "paper-25"])
def test_ragged_batch_matches_reference(preset):
    p = PRESETS[preset]
    batch = make_batch([clip_row(s, 3, 4) for s in (2, 5, 3, 8)], D, seed=3)
    for output in ("packed", "right", "left"):
        ref, fast = run_both(batch, SELECTOR, p.rho_video, p.rho_audio, output=output)
        assert_same_result(ref, fast)
        _, fast_grid = run_both(batch, SELECTOR, p.rho_video, p.rho_audio, output=output, grid=True)
        assert_same_result(ref, fast_grid)


@pytest.mark.parametrize("rows, equal_chunks", [([(4, 3, 4)], True), ([(4, 3, 4), (4, 3, 4)], True),
                                                 ([(4, 3, 4), (3, 3, 4)], False)])
def test_equal_and_unequal_chunks_match_reference(rows, equal_chunks):
    """Chunks of equal size take the selector's view path (no padded blocks, no key mask), others the
    padded one; both equal the reference, and the layouts really exercise the branch they name."""
    from omnisift_kernels.plan import build_plan, read_sizes

    batch = make_batch([clip_row(*r) for r in rows], D, seed=7)
    p = PRESETS["paper-35"]
    plan = build_plan(batch.input_ids, batch.position_ids[0], batch.attention_mask.bool(),
                      video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id,
                      rho_video=p.rho_video, rho_audio=p.rho_audio, score_audio=True)
    sizes = read_sizes(plan)
    C = sizes.num_chunks
    uniform_video = sizes.num_video_kept == C * sizes.max_chunk_video
    uniform_audio = sizes.num_audio_assigned == C * sizes.max_chunk_audio
    assert (uniform_video and uniform_audio) == equal_chunks
    ref, fast = run_both(batch, SELECTOR, p.rho_video, p.rho_audio, output="packed")
    assert_same_result(ref, fast)
    torch.testing.assert_close(fast.audio_scores, ref.audio_scores, atol=1e-5, rtol=1e-5)


def test_retention_of_paper_presets_on_omni7b_20s_layout():
    batch = make_batch([clip_row(20, 13, 23)], 8, seed=0)
    sel = VisionGuidedAudioSelector(8, num_heads=2, hidden_dim=8)
    for preset, kept in (("paper-35", 1980 + 300), ("paper-25", 1380 + 250)):
        p = PRESETS[preset]
        with torch.no_grad():
            r = compress(**batch.compress_kwargs(), rho_video=p.rho_video, rho_audio=p.rho_audio, selector=sel, backend="cpu")
        assert int(r.video_kept.sum() + r.audio_kept.sum()) == kept
        assert r.retention() == kept / 6480


def test_compact_indices_equals_nonzero():
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 100):
        mask = torch.rand(n, generator=g) > 0.5
        assert torch.equal(compact_indices(mask, int(mask.sum())), mask.nonzero().flatten())


# ------------------------------------------------------------------------------------------------
# Sync-freedom, compile, gradients, modules, backends.

@pytest.mark.interpreter
def test_fast_path_with_grid_never_syncs(monkeypatch):
    """The device logic (grid checked by a device-side assertion, not a host read) run on CPU tensors
    under the guard; the grid check kernel runs in the Triton interpreter."""
    import omnisift_kernels.pipeline as pipeline

    monkeypatch.setattr(pipeline, "host_reads_are_free", lambda device: False)
    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3), [Text(2), Audio(20)]], D, seed=2)
    for output in ("packed", "right", "left"):
        with forbid_host_sync():
            fast = compress(
                **batch.compress_kwargs(), rho_video=0.67, rho_audio=0.4, selector=SELECTOR,
                backend="cpu", grid=batch.rows, output=output,
            )
        ref, _ = run_both(batch, SELECTOR, 0.67, 0.4, output=output)
        with torch.no_grad():
            assert_same_result(ref, fast)


def test_fast_path_without_grid_syncs_exactly_once(monkeypatch):
    """Everything runs under the guard except the one sizes read, which is counted."""
    import omnisift_kernels.pipeline as pipeline

    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3)], D, seed=2)
    guard = forbid_host_sync()
    real = pipeline.read_sizes
    calls = []

    def unguarded(*args):
        calls.append(1)
        guard.__exit__(None, None, None)
        try:
            return real(*args)
        finally:
            guard.__enter__()

    monkeypatch.setattr(pipeline, "read_sizes", unguarded)
    monkeypatch.setattr(pipeline, "host_reads_are_free", lambda device: False)  # the device logic
    with torch.no_grad(), guard:
        compress(**batch.compress_kwargs(), rho_video=0.67, rho_audio=0.4, selector=SELECTOR, backend="cpu")
    assert len(calls) == 1


def test_sync_guard_catches_syncs():
    x = torch.randn(4)
    for f in (lambda: x[0].item(), lambda: x.tolist(), lambda: x[x > 0], lambda: x.nonzero(), lambda: bool(x.sum() > 0)):
        with pytest.raises(HostSyncError), forbid_host_sync():
            f()


def test_nan_embeddings_raise_in_the_single_read():
    batch = make_batch([clip_row(2, 2, 2)], D, seed=0)
    batch.inputs_embeds[0, 5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress(**batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, selector=SELECTOR, backend="cpu")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress(**batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, selector=SELECTOR, backend="cpu",
                 grid=batch.rows, validate=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["video", "audio", "text", "padding"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_in_any_row_raises(dtype, kind, bad):
    """Validation covers every element wherever it is checked (video rows by the C++ video kernel on
    the CPU, the other rows by all_finite), with and without grid, on both CPU backends."""
    batch = make_batch([clip_row(3, 2, 2), clip_row(2, 2, 2)], D, seed=5, dtype=dtype)
    ids = batch.input_ids
    target = {"video": ids == batch.video_token_id, "audio": ids == batch.audio_token_id,
              "text": (ids != batch.video_token_id) & (ids != batch.audio_token_id) & batch.attention_mask.bool(),
              "padding": ~batch.attention_mask.bool()}[kind]
    if not target.any():
        pytest.skip(f"no {kind} token in this layout")
    b, pos = (int(v) for v in target.nonzero()[-1])
    batch.inputs_embeds[b, pos, D - 1] = bad
    kw = dict(batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, selector=SELECTOR)
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress(**kw, backend="cpu")
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress(**kw, backend="cpu", grid=batch.rows, validate=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        compress(**kw, backend="reference")


def test_huge_finite_embeddings_pass_validation():
    """Squared norms overflow to Inf for |x| ~ 1e20 in fp32: the video kernel then checks the row
    element by element instead of reporting a false NaN/Inf."""
    batch = make_batch([clip_row(2, 2, 2)], D, seed=6)
    video = batch.input_ids[0] == batch.video_token_id
    pos = int(video.nonzero()[0])
    batch.inputs_embeds[0, pos] = 1e30
    kw = dict(batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, selector=SELECTOR)
    res = compress(**kw, backend="cpu", validate=True)
    assert res.keep_mask.shape == batch.input_ids.shape


def test_compile_fullgraph_with_grid():
    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3)], D, seed=4)
    module = OmniSIFTCompressor(D, num_heads=4, hidden_dim=16, backend="cpu")
    kw = dict(video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id, grid=batch.rows)
    args = (batch.inputs_embeds, batch.input_ids, batch.position_ids, batch.attention_mask, batch.labels)
    with torch.no_grad():
        eager = module(*args, **kw)
        compiled = torch.compile(module, fullgraph=True)(*args, **kw)
    assert torch.equal(eager.keep_mask, compiled.keep_mask)
    assert torch.equal(eager.inputs_embeds, compiled.inputs_embeds)
    assert torch.equal(eager.position_ids, compiled.position_ids)


def test_compile_fullgraph_with_grid_bf16_selector():
    """A bf16 module compiles with fullgraph too (under tracing the selector's GEMMs are F.linear, not
    the eager path's widened fp32 GEMMs, so masks agree up to near ties of the bf16 scores)."""
    from omnisift_kernels.testing import near_tie_differences

    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3)], D, dtype=torch.bfloat16, seed=4)
    module = OmniSIFTCompressor(D, num_heads=4, hidden_dim=16, backend="cpu").to(torch.bfloat16)
    kw = dict(video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id, grid=batch.rows)
    args = (batch.inputs_embeds, batch.input_ids, batch.position_ids, batch.attention_mask, batch.labels)
    with torch.no_grad():
        eager = module(*args, **kw)
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True)(*args, **kw)
    near_tie_differences(compiled.keep_mask, eager.keep_mask, eager.audio_scores, batch.inputs_embeds,
                         batch.input_ids, batch.position_ids, batch.attention_mask,
                         video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id,
                         selector_dtype=torch.bfloat16)
    flat = batch.inputs_embeds.flatten(0, 1)
    assert torch.equal(compiled.inputs_embeds, flat[compiled.indices])


def test_selector_gradients_match_reference():
    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3)], D, dtype=torch.float64, seed=5)
    grads = {}
    for backend in ("reference", "cpu"):
        sel = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).double()
        sel.load_state_dict(SELECTOR.state_dict())
        x = batch.inputs_embeds.clone().requires_grad_(True)
        kw = batch.compress_kwargs()
        kw["inputs_embeds"] = x
        r = compress(**kw, rho_video=0.67, rho_audio=0.4, selector=sel, backend=backend)
        weight = torch.linspace(-1, 1, r.inputs_embeds.numel(), dtype=torch.float64).view_as(r.inputs_embeds)
        (r.inputs_embeds * weight).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in sel.named_parameters()}
        grads[backend]["inputs_embeds"] = x.grad.clone()
    # Scores are fp32 in both paths (spec §8), so gradients through them carry fp32 rounding.
    atol, rtol = tolerance(torch.float32, "score")
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["cpu"][name], g, rtol=rtol, atol=atol, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads["cpu"].items() if n != "inputs_embeds")


@pytest.mark.parametrize("x_grad", [False, True])
def test_selector_gradients_match_reference_fp32(x_grad):
    """fp32 embeddings: without a gradient for them the CPU path prunes and gathers in the fused C++
    kernel; with one it gathers with torch (differentiable). The selector's gradients match the
    reference's either way, and so do the embeddings' when asked for."""
    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3)], D, seed=5)
    grads = {}
    for backend in ("reference", "cpu"):
        sel = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16)
        sel.load_state_dict(SELECTOR.state_dict())
        x = batch.inputs_embeds.clone().requires_grad_(x_grad)
        if backend == "cpu" and ext_has_kernel("video_keep_gather_cpu", "CPU"):
            assert keep_gather_serves(x, "cpu") == (not x_grad)  # the path this case means to test
        kw = dict(batch.compress_kwargs(), inputs_embeds=x)
        r = compress(**kw, rho_video=0.67, rho_audio=0.4, selector=sel, backend=backend)
        weight = torch.linspace(-1, 1, r.inputs_embeds.numel()).view_as(r.inputs_embeds)
        (r.inputs_embeds * weight).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in sel.named_parameters()}
        if x_grad:
            grads[backend]["inputs_embeds"] = x.grad.clone()
    atol, rtol = tolerance(torch.float32, "score")
    for name, g in grads["reference"].items():
        torch.testing.assert_close(grads["cpu"][name], g, rtol=rtol, atol=atol, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads["cpu"].items() if n != "inputs_embeds")


def test_compressor_module_overrides_and_state_dict():
    batch = make_batch([clip_row(4, 2, 3)], D, seed=6)
    m = OmniSIFTCompressor(D, preset="paper-25", num_heads=4, hidden_dim=16, backend="cpu")
    assert (m.rho_video, m.rho_audio) == (0.77, 0.5)
    kw = dict(video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id)
    args = (batch.inputs_embeds, batch.input_ids, batch.position_ids, batch.attention_mask)
    with torch.no_grad():
        default = m(*args, **kw)
        override = m(*args, **kw, rho_video=0.0, rho_audio=0.0)
        ref = compress(**batch.compress_kwargs(), rho_video=0.77, rho_audio=0.5, selector=m.selector, backend="reference")
    assert torch.equal(default.keep_mask, ref.keep_mask)
    assert torch.equal(override.keep_mask, batch.attention_mask.bool())
    clone = OmniSIFTCompressor(D, num_heads=4, hidden_dim=16)
    clone.load_state_dict(m.state_dict(), strict=True)
    assert all(k.startswith("selector.") for k in m.state_dict())
    with torch.no_grad():
        assert torch.equal(clone(*args, **kw, rho_video=0.77, rho_audio=0.5).keep_mask, default.keep_mask)
    with pytest.raises(ValueError, match="rho_audio"):
        OmniSIFTCompressor(D, rho_audio=1.0)
    with pytest.raises(ValueError, match="d_model"):
        OmniSIFTCompressor(D, selector=VisionGuidedAudioSelector(8, num_heads=2, hidden_dim=8))


def test_video_pruner_equals_compress_without_selector():
    batch = make_batch([clip_row(5, 2, 3), [Text(2), Video(3, 3, 3, audio_tokens=0)]], D, seed=7)
    pruner = SpatioTemporalVideoPruner(0.5, backend="cpu")
    assert not list(pruner.parameters())
    out = pruner(batch.inputs_embeds, batch.input_ids, batch.position_ids, batch.attention_mask,
                 video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id)
    ref = compress(**batch.compress_kwargs(), rho_video=0.5, rho_audio=0.9, selector=None, backend="reference")
    assert torch.equal(out.keep_mask, ref.keep_mask)
    assert torch.equal(out.audio_kept, out.audio_total)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMNISIFT_BACKEND", raising=False)
    assert resolve_backend("op", "auto", cpu) == "cpu"
    monkeypatch.setenv("OMNISIFT_BACKEND", "reference")
    assert resolve_backend("op", "auto", cpu) == "reference"
    assert resolve_backend("op", "cpu", cpu) == "cpu"  # an explicit argument wins
    monkeypatch.setenv("OMNISIFT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="OMNISIFT_BACKEND"):
        resolve_backend("op", "auto", cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("op", "fast", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        resolve_backend("op", "triton", cpu)


def test_grid_with_wrong_row_count_raises():
    batch = make_batch([clip_row(2, 2, 2)], D, seed=0)
    with pytest.raises(ValueError, match="grid"):
        compress(**batch.compress_kwargs(), rho_video=0.5, rho_audio=0.5, backend="cpu", grid=batch.rows * 2)


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or CUDA")
@pytest.mark.parametrize("output", ["packed", "left"])
def test_triton_backend_matches_reference(output):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout = [clip_row(3, 2, 3), [Text(2), Video(3, 2, 2), Video(2, 3, 3), Text(1)], [Text(3), Audio(30)]]
    batch = make_batch(layout, D, seed=8, device=device)
    sel = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).to(device)
    sel.load_state_dict(SELECTOR.state_dict())
    for grid in (False, True):
        ref, fast = run_both(batch, sel, 0.67, 0.4, output=output, grid=grid, backend="triton")
        assert_same_result(ref, fast)
