"""GPU: compute-sanitizer (memcheck, racecheck) over the extension's CUDA ops and the Triton
kernels, in a subprocess. Skipped without CUDA or without compute-sanitizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import torch
    from omnisift_kernels.ops import varlen as V, video_scores, segmented_topk_mask, gather_ste
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 301, 1030, generator=g).to(dtype).to(dev)
        keep = (torch.rand(3, 301, generator=g) > 0.5).to(dev)
        pos = torch.randint(0, 999, (3, 3, 301), generator=g).to(dev)
        r = V.varlen_compact(x, keep, position_ids=pos)
        r2 = V.varlen_compact(x, keep, total=int(keep.sum()))
        V.varlen_scatter(r.packed, r.indices, 3, 301)
        V.varlen_gather(x.flatten(0, 1), r.indices)
        V.varlen_pad(x, keep, side="left")
        tok = torch.arange(0, 600, device=dev)
        off = torch.tensor([0, 299, 598, 600], device=dev)
        pair = torch.full((600,), -1, device=dev)
        pair[299:598] = tok[:299]
        video_scores(x, tok, off, pair)
        segmented_topk_mask(torch.rand(600, generator=g).to(dev), off, torch.tensor([100, 100, 1], device=dev))
        s = torch.rand(3, 301, device=dev, requires_grad=True)
        xg = x.detach().requires_grad_(True)
        gather_ste(xg, r.indices, s).sum().backward()
    torch.cuda.synchronize()
    print("SANITIZER-SCRIPT-OK")
    """
)


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "compute-sanitizer").exists():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(cuda_device, tool, tmp_path):
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = str(cuda_device.index or 0)
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--target-processes", "application-only",
           sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "SANITIZER-SCRIPT-OK" in out, out[-8000:]
    assert "ERROR SUMMARY: 0 errors" in out or "RACECHECK SUMMARY: 0 hazards" in out, out[-8000:]
