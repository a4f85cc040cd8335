"""GPU: the Qwen2.5-Omni integration on CUDA (a tiny random thinker) against the same model on the
CPU with the reference backend. Marked ``gpu``: skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from omnisift_kernels import synthetic as syn  # noqa: E402
from omnisift_kernels.integrations.qwen2_5_omni import OmniSIFTThinker  # noqa: E402
from omnisift_kernels.testing.qwen2_5_omni import build_inputs, tiny_random_thinker  # noqa: E402

pytestmark = pytest.mark.gpu

V, T = syn.Video, syn.Text
ROWS = [[T(5), V(4, 2, 2), T(3)], [T(3), V(3, 2, 2), T(2)]]


def _to(inp, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _pair(device):
    thinker = tiny_random_thinker(seed=0)
    torch.manual_seed(1)
    cpu = OmniSIFTThinker(thinker, rho_video=0.5, rho_audio=0.5, backend="reference")
    gpu = OmniSIFTThinker(copy.deepcopy(thinker).to(device), rho_video=0.5, rho_audio=0.5, backend="auto")
    gpu.selector.load_state_dict(cpu.selector.state_dict())
    return cpu, gpu


def test_forward_and_backward_match_cpu_reference(cuda_device):
    cpu, gpu = _pair(cuda_device)
    inp = dict(build_inputs(tiny_random_thinker(seed=0).config, ROWS, answer=4))
    labels = inp.pop("labels")
    ref = cpu(**inp, labels=labels)
    out = gpu(**_to(inp, cuda_device), labels=labels.to(cuda_device))
    assert torch.equal(out.keep_mask.cpu(), ref.keep_mask)
    assert gpu.last_stats["kept_length"] == cpu.last_stats["kept_length"]
    torch.testing.assert_close(out.loss.cpu(), ref.loss, atol=1e-4, rtol=1e-4)
    mask = out.attention_mask.bool()
    torch.testing.assert_close(out.logits[mask].cpu(), ref.logits[ref.attention_mask.bool()], atol=1e-4, rtol=1e-4)
    for p in gpu.selector.parameters():
        p.requires_grad_(True)
    out.loss.backward()
    assert all(p.grad is not None for p in gpu.selector.parameters())


def test_generate_on_cuda(cuda_device):
    cpu, gpu = _pair(cuda_device)
    inp = build_inputs(tiny_random_thinker(seed=0).config, ROWS, padding_side="left")
    with torch.no_grad():
        got = gpu.generate(**_to(inp, cuda_device), max_new_tokens=4, do_sample=False)
        ref = cpu.generate(**inp, max_new_tokens=4, do_sample=False)
    assert got.shape == ref.shape
    assert gpu.last_stats["kept_length"] == cpu.last_stats["kept_length"]
