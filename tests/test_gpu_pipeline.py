"""GPU: the whole compression on CUDA (backend "triton") against the reference and the CPU path,
random layouts (hypothesis), the sync-free ``grid=`` path under ``set_sync_debug_mode("error")``,
CUDA graph capture and replay, and ``torch.compile(fullgraph=True)``.

The reference always runs on CPU copies of the inputs: it is the oracle, independent of the code
under test. Marked ``gpu``: skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnisift_kernels import PRESETS, OmniSIFTCompressor, VisionGuidedAudioSelector, compress
from omnisift_kernels.layout import Audio, Image, Text, Video
from omnisift_kernels.sync_guard import forbid_host_sync
from omnisift_kernels.synthetic import clip_row, make_batch
from omnisift_kernels.testing import near_tie_differences

from test_pipeline import assert_same_result

pytestmark = pytest.mark.gpu

D = 64
torch.manual_seed(0)
SELECTOR = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).eval()
LAYOUT = [clip_row(4, 3, 4), [Text(2), Video(3, 2, 2), Video(2, 3, 3), Text(1)], [Text(3), Audio(30)]]


def _selector(device, dtype=torch.float32):
    sel = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=16).eval()
    sel.load_state_dict(SELECTOR.state_dict())
    return sel.to(device=device, dtype=dtype)


def _run(batch, device, sel_dtype, rho, output, grid):
    cpu_kw = batch.compress_kwargs()
    dev_kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cpu_kw.items()}
    common = dict(rho_video=rho[0], rho_audio=rho[1], output=output)
    with torch.no_grad():
        ref = compress(**cpu_kw, **common, selector=_selector("cpu", sel_dtype), backend="reference")
        cpu = compress(**cpu_kw, **common, selector=_selector("cpu", sel_dtype), backend="cpu",
                       grid=batch.rows if grid else None)
        gpu = compress(**dev_kw, **common, selector=_selector(device, sel_dtype), backend="triton",
                       grid=batch.rows if grid else None)
    return ref, cpu, gpu


@pytest.mark.parametrize("preset", ["paper-35", "paper-25", "release-default"])
@pytest.mark.parametrize("output", ["packed", "right", "left"])
@pytest.mark.parametrize("grid", [False, True])
def test_triton_matches_reference_and_cpu_fp32(cuda_device, preset, output, grid):
    batch = make_batch(LAYOUT, D, seed=8)
    p = PRESETS[preset]
    ref, cpu, gpu = _run(batch, cuda_device, torch.float32, (p.rho_video, p.rho_audio), output, grid)
    assert_same_result(ref, gpu)
    assert_same_result(cpu, gpu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_half(cuda_device, dtype):
    """A half-precision selector rounds differently per implementation: masks equal up to the
    documented near ties (``testing.near_tie_differences``); video cosines are fp64-exact anyway."""
    batch = make_batch(LAYOUT, D, seed=9, dtype=dtype)
    ref, _, gpu = _run(batch, cuda_device, dtype, (0.67, 0.4), "packed", True)
    near_tie_differences(gpu.keep_mask.cpu(), ref.keep_mask, ref.audio_scores, batch.inputs_embeds,
                         batch.input_ids, batch.position_ids, batch.attention_mask,
                         video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id,
                         selector_dtype=dtype)


@pytest.mark.parametrize("mode", ["fp64", "compensated"])
def test_accumulation_modes_keep_reference_masks(cuda_device, monkeypatch, mode):
    monkeypatch.setenv("OMNISIFT_VIDEO_ACCUMULATION", mode)
    batch = make_batch([clip_row(20, 13, 23)], 3584, seed=1, dtype=torch.bfloat16)
    kw = batch.compress_kwargs()
    with torch.no_grad():
        ref = compress(**kw, rho_video=0.67, rho_audio=0.0, backend="reference")
        gpu = compress(**{k: (v.to(cuda_device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
                       rho_video=0.67, rho_audio=0.0, backend="triton", grid=batch.rows)
    near_tie_differences(gpu.keep_mask.cpu(), ref.keep_mask, None, batch.inputs_embeds, batch.input_ids,
                         batch.position_ids, batch.attention_mask, video_token_id=batch.video_token_id,
                         audio_token_id=batch.audio_token_id, selector_dtype=torch.bfloat16)


videos = st.builds(Video, seconds=st.integers(1, 5), frame_h=st.integers(1, 3), frame_w=st.integers(1, 4),
                   audio_tokens=st.one_of(st.none(), st.just(0), st.integers(1, 140)))
media = st.one_of(videos, videos, st.builds(Audio, st.integers(1, 60)),
                  st.builds(Image, st.integers(1, 2), st.integers(1, 3)))
rows = st.builds(lambda pre, items, post: [Text(pre), *items, Text(post)],
                 st.integers(0, 6), st.lists(media, min_size=0, max_size=3), st.integers(0, 6))
ratios = st.one_of(st.sampled_from([(p.rho_video, p.rho_audio) for p in PRESETS.values()]),
                   st.tuples(st.floats(0, 0.95), st.floats(0, 0.95)))


@settings(max_examples=60, deadline=None)
@given(layout=st.lists(rows, min_size=1, max_size=3), rho=ratios,
       output=st.sampled_from(["packed", "right", "left"]), grid=st.booleans(),
       with_selector=st.booleans(), seed=st.integers(0, 2**16))
def test_random_layouts_match_reference(layout, rho, output, grid, with_selector, seed):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    batch = make_batch(layout, D, seed=seed)
    cpu_kw = batch.compress_kwargs()
    dev_kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cpu_kw.items()}
    common = dict(rho_video=rho[0], rho_audio=rho[1], output=output)
    with torch.no_grad():
        ref = compress(**cpu_kw, **common, selector=SELECTOR if with_selector else None, backend="reference")
        gpu = compress(**dev_kw, **common, selector=_selector(device) if with_selector else None,
                       backend="triton", grid=batch.rows if grid else None)
    assert_same_result(ref, gpu)


def _module_and_args(device, seed=4, backend="triton"):
    batch = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3)], D, seed=seed)
    module = OmniSIFTCompressor(D, num_heads=4, hidden_dim=16, backend=backend).to(device).eval()
    module.selector.load_state_dict(SELECTOR.state_dict())
    args = tuple(t.to(device) for t in (batch.inputs_embeds, batch.input_ids, batch.position_ids,
                                        batch.attention_mask, batch.labels))
    kw = dict(video_token_id=batch.video_token_id, audio_token_id=batch.audio_token_id, grid=batch.rows)
    return batch, module, args, kw


@pytest.mark.parametrize("output", ["packed", "right"])
def test_grid_path_under_sync_debug_error(cuda_device, output):
    batch, module, args, kw = _module_and_args(cuda_device)
    with torch.no_grad():
        module(*args, **kw, output=output)  # compiles the Triton kernels outside the check
        torch.cuda.synchronize()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with forbid_host_sync():
                out = module(*args, **kw, output=output)
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        ref = compress(**batch.compress_kwargs(), rho_video=module.rho_video, rho_audio=module.rho_audio,
                       selector=SELECTOR, output=output, backend="reference")
    assert_same_result(ref, out)


def test_cuda_graph_capture_and_replay(cuda_device):
    batch, module, args, kw = _module_and_args(cuda_device, seed=4)
    batch2 = make_batch([clip_row(4, 2, 3), clip_row(3, 2, 3)], D, seed=5)  # same layout, new values
    static = [a.clone() for a in args]
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: Triton compiles, the allocator settles
                module(*static, **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = module(*static, **kw)
        static[0].copy_(batch2.inputs_embeds.to(cuda_device))
        graph.replay()
        torch.cuda.synchronize()
        ref = compress(**batch2.compress_kwargs(), rho_video=module.rho_video, rho_audio=module.rho_audio,
                       selector=SELECTOR, backend="reference")
    assert_same_result(ref, captured)


def test_compile_fullgraph_on_cuda(cuda_device):
    batch, module, args, kw = _module_and_args(cuda_device, seed=6)
    with torch.no_grad():
        eager = module(*args, **kw)
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True)(*args, **kw)
        ref = compress(**batch.compress_kwargs(), rho_video=module.rho_video, rho_audio=module.rho_audio,
                       selector=SELECTOR, backend="reference")
    assert_same_result(ref, compiled)
    assert_same_result(eager, compiled)
