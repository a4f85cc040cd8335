"""The CPU block cache under concurrency: the fast path swaps torch's process-wide CPU allocator for the
extension's cache while a call runs (``csrc/cpu_alloc.h``), so other threads allocate from it too.

What must hold, and is checked here (``make test-asan`` runs this file against an AddressSanitizer +
UndefinedBehaviorSanitizer build of the extension, which turns a double free, a use after free or a
heap overflow into a failure):

* two compressions running at once in two threads give the reference's results;
* other threads allocating, filling, checking and freeing large tensors (256 KiB to 8 MiB, above the
  cache's floor) and running torch's own ops (matmul, cat, sort) meanwhile see their data intact, and
  tensors allocated inside a call and freed after it (or the other way round) are freed once;
* the allocator torch had before is back once no call runs, and memory does not grow round after round
  (the cache stays within its limit, resident memory levels off).
"""

from __future__ import annotations

import threading

import pytest
import torch

from omnisift_kernels import VisionGuidedAudioSelector, compress
from omnisift_kernels._ext import EXT_AVAILABLE, ext_has_kernel
from omnisift_kernels.synthetic import clip_row, make_batch

pytestmark = pytest.mark.skipif(not (EXT_AVAILABLE and ext_has_kernel("varlen_gather", "CPU")),
                                reason="needs the C++ extension (its block cache)")

D = 256


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _inputs():
    batch = make_batch([clip_row(6, 6, 8), clip_row(4, 6, 8)], D, seed=11)
    torch.manual_seed(0)
    selector = VisionGuidedAudioSelector(D, num_heads=4, hidden_dim=64).eval()
    return batch, selector


def _call(batch, selector, backend="cpu"):
    with torch.no_grad():
        return compress(**batch.compress_kwargs(), rho_video=0.67, rho_audio=0.4, selector=selector,
                        backend=backend)


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("keep_mask", "inputs_embeds", "position_ids", "labels", "cu_seqlens"))


def _churn(stop: threading.Event, errors: list, seed: int, kept: list) -> None:
    """Allocates large tensors, checks their contents, runs torch ops, frees them; keeps a few alive
    across calls so they are freed under another allocator than the one that made them."""
    g = torch.Generator().manual_seed(seed)
    i = 0
    try:
        while not stop.is_set():
            n = int(torch.randint(64 * 1024, 2 * 1024 * 1024, (1,), generator=g))  # 256 KiB .. 8 MiB fp32
            t = torch.empty(n).fill_(float(i % 7))
            if float(t[n // 2]) != float(i % 7) or float(t[-1]) != float(i % 7):
                errors.append(f"churn {seed}: a fresh tensor lost its contents")
            a = torch.randn(96, 128, generator=g)
            b = torch.randn(128, 64, generator=g)
            c = a @ b
            if not torch.allclose(c, (a.double() @ b.double()).float(), atol=1e-4, rtol=1e-4):
                errors.append(f"churn {seed}: matmul result differs")
            s = torch.cat([t[:1000], t[:1000]]).sort().values
            if float(s[0]) != float(i % 7):
                errors.append(f"churn {seed}: cat/sort result differs")
            if i % 5 == 0:
                kept.append(t)  # freed later, maybe under the other allocator
                if len(kept) > 6:
                    kept.pop(0)
            i += 1
    except Exception as e:  # reported to the main thread
        errors.append(f"churn {seed}: {type(e).__name__}: {e}")


def test_concurrent_calls_and_allocations_are_safe():
    batch, selector = _inputs()
    want = _call(batch, selector, backend="reference")  # fp32 selector: the fast path agrees exactly
    assert _same(_call(batch, selector), want)
    allocator_before = torch.ops.omnisift.cpu_allocator_scope(False)  # no scope open: False
    assert allocator_before is False

    errors: list[str] = []
    stop = threading.Event()
    kept: list = []
    churners = [threading.Thread(target=_churn, args=(stop, errors, s, kept)) for s in (1, 2)]
    results: list = []

    def compressor(rounds: int) -> None:
        try:
            for _ in range(rounds):
                results.append(_call(batch, selector))
        except Exception as e:  # reported to the main thread
            errors.append(f"compress: {type(e).__name__}: {e}")

    callers = [threading.Thread(target=compressor, args=(6,)) for _ in range(2)]
    for t in churners + callers:
        t.start()
    for t in callers:
        t.join(timeout=600)
    stop.set()
    for t in churners:
        t.join(timeout=60)
    kept.clear()
    assert not errors, errors
    assert len(results) == 12
    bad = [i for i, r in enumerate(results) if not _same(r, want)]
    assert not bad, f"calls {bad} differ from the reference"
    # No scope is left open: the allocator torch had is back.
    assert torch.ops.omnisift.cpu_allocator_scope(False) is False
    assert torch.ops.omnisift.cpu_output_cache_bytes() <= torch.ops.omnisift.cpu_output_cache_limit()


@pytest.mark.skipif("libasan" in __import__("os").environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer keeps freed memory in quarantine: resident memory says nothing")
def test_memory_levels_off_round_after_round():
    """The cache reuses blocks: after a warm-up, more rounds of calls (and of other threads' large
    allocations) do not grow the resident memory by more than a few blocks."""
    batch, selector = _inputs()
    for _ in range(3):
        _call(batch, selector)
    start = _rss_mb()
    for _ in range(15):
        out = _call(batch, selector)
        junk = [torch.empty(300_000).fill_(1.0) for _ in range(4)]  # 1.2 MB each, freed at once
        del out, junk
    grown = _rss_mb() - start
    assert grown < 48, f"resident memory grew by {grown:.1f} MB over 15 rounds"
    assert torch.ops.omnisift.cpu_output_cache_bytes() <= torch.ops.omnisift.cpu_output_cache_limit()
