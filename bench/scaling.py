"""Time and peak memory vs clip length (10 s to 600 s) for one provider.

Points follow ``shared/spec/workloads.md``: frames 13x23 up to 300 s, 9x16 at 600 s (the
``omni7b-600s`` shape), D = 3584, one row. ``--quick`` uses 4-16 s clips of 4x6 frames at D = 64.

Peak memory
-----------
* CUDA: ``torch.cuda.max_memory_allocated`` over one call, minus what was allocated before it.
* CPU: torch does not track CPU allocations, so every point runs in its own subprocess (in this
  process with ``--quick``)
  (``python -m bench.scaling --point ...``), which builds its inputs, frees the blocks the extension
  keeps for reuse and returns freed heap to the OS (``malloc_trim``), resets the kernel's RSS
  high-water mark (``/proc/self/clear_refs`` ``5``) and reports ``VmHWM - VmRSS`` around one call: the extra resident memory of the call, inputs excluded.
  Where ``clear_refs`` is not writable it falls back to ``resource.getrusage`` (``ru_maxrss``, which
  then includes building the inputs; the method is recorded per point).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

import torch

FULL_POINTS = [(10, 13, 23), (20, 13, 23), (60, 13, 23), (120, 13, 23), (300, 13, 23), (600, 9, 16)]
FULL_D = 3584
QUICK_POINTS = [(4, 4, 6), (8, 4, 6), (16, 4, 6)]
QUICK_D = 64
POINT_TIMEOUT_S = 600


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_point(seconds: int, frame_h: int, frame_w: int, d_model: int, *, provider: str, dtype: str,
                  preset: str, device: torch.device, repeat: int | None, budget_s: float, seed: int = 0) -> dict:
    """Times one clip length and measures the peak memory of one call (in this process)."""
    from omnisift_kernels.presets import PRESETS

    from .cases import DTYPES, Case, clip_batch, counts, make_selector
    from .providers import PROVIDERS
    from .timing import time_fn

    torch.set_grad_enabled(False)
    batch = clip_batch(seconds, frame_h, frame_w, d_model, dtype=DTYPES[dtype], device=device, seed=seed)
    sel = make_selector(d_model, device=device)
    case = Case(f"clip-{seconds}s", dtype, PRESETS[preset], seed, batch, sel)
    fn = PROVIDERS[provider].e2e(case)
    t = time_fn(lambda i: fn(), 1, device, repeat=repeat, budget_s=budget_s, min_repeat=3, max_repeat=50)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        method = "torch.cuda.max_memory_allocated"
        del out
    else:
        # Blocks the extension keeps for reuse (csrc/cpu_alloc.h) would let the measured call run in
        # memory that is already resident: freed first, so the call's own peak is what is measured.
        if hasattr(torch.ops.omnisift, "release_cpu_output_cache"):
            torch.ops.omnisift.release_cpu_output_cache()
        _trim()
        if _reset_hwm() and _status_kb("VmHWM") is not None:
            base = _status_kb("VmRSS") * 1024
            out = fn()
            peak = _status_kb("VmHWM") * 1024 - base
            method = "VmHWM after clear_refs (RSS increase of one call)"
        else:
            import resource

            out = fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            method = "ru_maxrss (process high-water, inputs included)"
        del out
    c = counts(batch)
    return {
        "seconds": seconds, "frame": f"{frame_h}x{frame_w}", "d_model": d_model, "tokens": c["valid"],
        "video": c["video"], "audio": c["audio"], "provider": provider, "dtype": dtype, "preset": preset,
        "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "n": t.n,
        "peak_mem_mb": peak / 2**20, "input_mb": batch.inputs_embeds.numel() * batch.inputs_embeds.element_size() / 2**20,
        "mem_method": method,
    }


def run_scaling(*, provider: str, dtype: str, preset: str, device: torch.device, quick: bool,
                repeat: int | None, progress=None, log=print) -> list[dict]:
    """Every point of the scaling section (a subprocess per point on the CPU)."""
    points = QUICK_POINTS if quick else FULL_POINTS
    d_model = QUICK_D if quick else FULL_D
    budget = 0.05 if quick else 1.0
    out = []
    for seconds, h, w in points:
        if device.type == "cuda" or quick:  # quick: in this process (seconds; memory then includes noise)
            try:
                res = measure_point(seconds, h, w, d_model, provider=provider, dtype=dtype, preset=preset,
                                    device=device, repeat=repeat, budget_s=budget)
            except Exception as e:  # e.g. out of memory at 600 s
                res = {"seconds": seconds, "frame": f"{h}x{w}", "error": f"{type(e).__name__}: {e}"[:200]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            cmd = [sys.executable, "-m", "bench.scaling", "--point", str(seconds), str(h), str(w), str(d_model),
                   "--provider", provider, "--dtype", dtype, "--preset", preset, "--budget", str(budget)]
            if repeat is not None:
                cmd += ["--repeat", str(repeat)]
            env = dict(os.environ)
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
            env.setdefault("PYTHONWARNINGS", "ignore")
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=POINT_TIMEOUT_S, env=env, cwd=root)
                if p.returncode != 0:
                    res = {"seconds": seconds, "frame": f"{h}x{w}",
                           "error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:200]}
                else:
                    res = json.loads(p.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                res = {"seconds": seconds, "frame": f"{h}x{w}", "error": f"timed out after {POINT_TIMEOUT_S} s"}
        out.append(res)
        if progress is not None:
            progress.update(1)
    return out


def format_scaling(points: list[dict]) -> str:
    head = f"{'clip':>6} | {'frame':>5} | {'tokens':>7} | {'median ms':>9} | {'p20-p80 ms':>15} | {'peak MB':>8} | {'input MB':>8}"
    lines = [head, "-" * len(head)]
    for p in points:
        if "error" in p:
            lines.append(f"{p['seconds']:>5}s | {p['frame']:>5} | error: {p['error']}")
            continue
        lines.append(
            f"{p['seconds']:>5}s | {p['frame']:>5} | {p['tokens']:>7} | {p['median_ms']:>9.1f} | "
            f"{p['p20_ms']:>7.1f}-{p['p80_ms']:<7.1f} | {p['peak_mem_mb']:>8.1f} | {p['input_mb']:>8.1f}"
        )
    return "\n".join(lines)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one scaling point (used by python -m bench --scaling)")
    ap.add_argument("--point", nargs=4, type=int, metavar=("SECONDS", "H", "W", "D"), required=True)
    ap.add_argument("--provider", required=True)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--preset", default="paper-35")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--budget", type=float, default=1.0)
    a = ap.parse_args(argv)
    s, h, w, d = a.point
    res = measure_point(s, h, w, d, provider=a.provider, dtype=a.dtype, preset=a.preset,
                        device=torch.device("cpu"), repeat=a.repeat, budget_s=a.budget)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
