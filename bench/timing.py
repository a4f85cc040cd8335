"""Timing done one way everywhere: warm-up excluded, inputs rotated, median and p20/p80.

* CPU: ``time.perf_counter`` around each call.
* CUDA: ``triton.testing.do_bench`` when Triton is importable (it flushes the L2 cache between
  calls), else CUDA events around each call.

The timed callable takes the index of an input set (``fn(i)``) and is called with ``i`` rotating
over ``n_inputs`` sets built once up front, so that a small shape does not get a warm cache for free.

Python's cyclic garbage collector is paused while calls are timed, as ``timeit`` does (after a
collection just before, outside the timed region): a collection runs inside whichever call happens to
cross the allocation threshold, and a full one takes 80-125 ms in a benchmark process of ~170,000
objects (measured), longer than the call it lands in. Memory freed by reference counting is
unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    samples_ms: list[float] = dataclasses.field(default_factory=list, repr=False)


def _quantile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted samples."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    s = sorted(samples_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), samples_ms)


def _repeat_for(per_call_s: float, budget_s: float, min_repeat: int, max_repeat: int) -> int:
    """Timed calls (or rounds) that fit in ``budget_s`` at ``per_call_s`` each, within the bounds."""
    return max(min_repeat, min(max_repeat, int(budget_s / max(per_call_s, 1e-7))))


@contextlib.contextmanager
def gc_paused():
    """Collects once, then keeps the cyclic garbage collector off for the block (restored after)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[int], object],
    n_inputs: int,
    device: torch.device,
    *,
    repeat: int | None = None,
    budget_s: float = 0.5,
    min_repeat: int = 5,
    max_repeat: int = 200,
    warmup: int = 1,
    exact_repeat: bool = False,
) -> Timing:
    """Times ``fn(i)`` rotating ``i`` over ``range(n_inputs)``.

    ``repeat`` fixes the number of timed calls; otherwise it is chosen so that the timed calls take
    about ``budget_s`` (within ``[min_repeat, max_repeat]``), from the warm-up calls' time.
    Warm-up calls (at least one per input set) are not counted. ``exact_repeat`` times exactly
    ``repeat`` calls on CUDA too (CUDA events instead of ``do_bench``, whose budget of at most 2 s
    leaves a single sample for calls of a second or more, such as a 7B prefill).
    """
    # Warm-up: every input set once (allocator, lazy init, compile caches), and measure the cost.
    t0 = time.perf_counter()
    for w in range(max(warmup, 1) * n_inputs):
        fn(w % n_inputs)
    _sync(device)
    per_call = (time.perf_counter() - t0) / (max(warmup, 1) * n_inputs)
    if repeat is None:
        repeat = _repeat_for(per_call, budget_s, min_repeat, max_repeat)
    with gc_paused():
        if device.type == "cuda":
            return _time_cuda(fn, n_inputs, device, repeat, use_do_bench=not exact_repeat)
        samples = []
        for r in range(repeat):
            i = r % n_inputs
            t = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - t) * 1e3)
    return summarize(samples)


def time_interleaved(
    fns: dict[str, Callable[[int], object]],
    n_inputs: int,
    device: torch.device,
    *,
    repeat: int | None = None,
    budget_s: float = 2.0,
    min_repeat: int = 9,
    max_repeat: int = 200,
) -> dict[str, Timing]:
    """Times several callables round-robin: each round calls every one once, on the same input set.

    Used for the end-to-end rows, whose ratios are the headline: on a shared VM whose speed drifts
    by tens of percent within seconds, timing one provider after the other lets a slow spell land on
    one of them; interleaved, every provider samples the same spells. The starting provider rotates
    each round (no fixed order effect). ``repeat`` rounds, else as many as fit in ``budget_s`` from the
    warm-up calls' time, within ``[min_repeat, max_repeat]``. On CUDA each call is synchronized.
    """
    names = list(fns)
    if not names:
        return {}
    t0 = time.perf_counter()
    for w in range(n_inputs):
        for name in names:
            fns[name](w)
    _sync(device)
    per_round = (time.perf_counter() - t0) / n_inputs
    if repeat is None:
        repeat = _repeat_for(per_round, budget_s, min_repeat, max_repeat)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with gc_paused():
        for r in range(repeat):
            i = r % n_inputs
            k = r % len(names)
            for name in names[k:] + names[:k]:
                _sync(device)
                t = time.perf_counter()
                fns[name](i)
                _sync(device)
                samples[name].append((time.perf_counter() - t) * 1e3)
    return {n: summarize(v) for n, v in samples.items()}


def _time_cuda(fn, n_inputs: int, device: torch.device, repeat: int, use_do_bench: bool = True) -> Timing:
    counter = [0]

    def rotating():
        fn(counter[0] % n_inputs)
        counter[0] += 1

    try:
        if not use_do_bench:
            raise ImportError  # the CUDA-event loop below
        from triton.testing import do_bench

        # do_bench picks its own number of calls from ``rep`` (ms); give it a budget matching repeat.
        first = torch.cuda.Event(enable_timing=True)
        last = torch.cuda.Event(enable_timing=True)
        first.record()
        rotating()
        last.record()
        torch.cuda.synchronize(device)
        est = max(first.elapsed_time(last), 1e-3)
        rep_ms = max(25.0, min(2000.0, est * repeat))
        med, p20, p80 = do_bench(rotating, warmup=max(5.0, est), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), int(rep_ms / est))
    except ImportError:
        pass
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for r in range(repeat):
        starts[r].record()
        rotating()
        ends[r].record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def copy_bandwidth(device: torch.device, *, quick: bool = False) -> tuple[float, Timing]:
    """Measured copy bandwidth in GB/s (read + write bytes of ``dst.copy_(src)`` over its median).

    256 MiB on the CPU (64 MiB with ``quick``), 1 GiB on CUDA: far beyond the caches.
    """
    nbytes = (1 << 30) if device.type == "cuda" else ((64 << 20) if quick else (256 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), 1, device, repeat=5 if quick else 15, warmup=2)
    # The best call is the ceiling (a loaded machine only ever slows a copy down). copy_ also pays
    # write-allocate traffic that the 2x count ignores, so a stage can exceed 100% of it.
    best_ms = min(t.samples_ms) if t.samples_ms else t.median_ms
    gbps = 2 * nbytes / (best_ms * 1e-3) / 1e9
    del src, dst
    return gbps, t
