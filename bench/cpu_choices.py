"""Measures the fast path's CPU choices on this machine (the figures in ``docs/cpu.md``, whose
reasons ``omnisift_kernels/cpu_gemm.py`` and ``csrc/cpu_alloc.h`` explain).

    python -m bench.cpu_choices [--rounds 12]

1. fp32 GEMM library: the selector's GEMM shapes at omni7b-20s paper-35 (``v_proj`` on the 1,980
   surviving video tokens, ``a_proj`` on the 500 audio tokens, keys+values on the survivors), ATen's
   ``F.linear`` (MKL) against oneDNN's ``_linear_pointwise``, in alternating blocks of 4 calls (the
   first call of each block not counted), so that both see the same spells of a shared VM.
2. Huge-page outputs: ``omnisift::varlen_gather`` of the omni7b-20s packed output (2,400 of 6,680
   rows of 3,584 fp32: 34 MB) with ``OMNISIFT_CPU_HUGEPAGES`` on and off, alternating blocks.
3. Selector attention: the extension's AVX-512 kernel (``omnisift::chunk_attention_cpu``) against
   ``scaled_dot_product_attention`` at omni7b-20s paper-35 (10 chunks, 50 queries, 198 keys, 8 heads
   of 64), alternating blocks.
4. End to end: ``compress(backend="cpu")`` on omni7b-20s paper-35, fp32 and bf16, as configured,
   with ``OMNISIFT_CPU_GEMM=aten``, with ``OMNISIFT_CPU_OUTPUT_CACHE_MB=0`` (no cache of freed
   blocks), with ``OMNISIFT_CPU_ATTENTION=sdpa``, and the release-style loop, round-robin (so each
   call follows another provider's, as in ``python -m bench``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F


def _blocks(fns: dict, rounds: int, per_block: int = 4) -> dict[str, list[float]]:
    """Alternating blocks: per round each callable ``per_block`` times (first call not timed)."""
    names = list(fns)
    out = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            for i in range(per_block):
                t = time.perf_counter()
                fns[n]()
                if i:
                    out[n].append((time.perf_counter() - t) * 1e3)
    return out


@contextlib.contextmanager
def _environ(**values: str):
    """Sets environment variables for the block, then restores what was there (the benchmark program's
    own environment; the extension is told to read its settings again both times)."""
    from omnisift_kernels._ext import reload_cpu_settings

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    reload_cpu_settings()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_cpu_settings()


def _summary(samples: list[float]) -> str:
    s = sorted(samples)
    return f"median {statistics.median(s):7.2f} ms  p20 {s[len(s) // 5]:7.2f}"


def gemm_libraries(rounds: int) -> None:
    print("1. fp32 GEMM: F.linear (MKL) vs oneDNN _linear_pointwise, alternating blocks of 4 calls")
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        print("   oneDNN linear unavailable in this torch")
        return
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, (m, k, n) in {"v_proj": (1980, 3584, 512), "a_proj": (500, 3584, 512),
                                "keys+values": (1980, 512, 1024)}.items():
            x = torch.randn(m, k, generator=g)
            w = torch.randn(n, k, generator=g) / k ** 0.5
            b = torch.randn(n, generator=g)
            res = _blocks({"mkl": lambda: F.linear(x, w, b),
                           "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")}, rounds)
            ratio = statistics.median(res["mkl"]) / statistics.median(res["onednn"])
            print(f"   {name:12s} [{m}, {k}] x [{k}, {n}]  mkl {_summary(res['mkl'])} | onednn "
                  f"{_summary(res['onednn'])} | mkl/onednn {ratio:.2f}")


def hugepage_outputs(rounds: int) -> None:
    print("2. varlen_gather of a 34 MB output into a new block (OMNISIFT_CPU_OUTPUT_CACHE_MB=0), "
          "OMNISIFT_CPU_HUGEPAGES=1 vs 0, alternating blocks of 4 calls; then with the block cache")
    from omnisift_kernels._ext import ext_has_kernel

    if not ext_has_kernel("varlen_gather", "CPU"):
        print("   the extension is not built")
        return
    x = torch.randn(6680, 3584)
    idx = torch.randperm(6680, generator=torch.Generator().manual_seed(0))[:2400].sort().values

    def gather(hugepages, cache_mb):
        def run():
            with _environ(OMNISIFT_CPU_HUGEPAGES=hugepages, OMNISIFT_CPU_OUTPUT_CACHE_MB=cache_mb):
                torch.ops.omnisift.varlen_gather(x, idx)
        return run

    res = _blocks({"on": gather("1", "0"), "off": gather("0", "0"), "cached": gather("1", "256")}, rounds)
    print(f"   huge pages on  {_summary(res['on'])}\n   huge pages off {_summary(res['off'])}\n"
          f"   block cache    {_summary(res['cached'])}")


def selector_attention(rounds: int) -> None:
    print("3. selector attention [10, 50 | 198, 512], 8 heads: chunk_attention_cpu vs "
          "scaled_dot_product_attention, alternating blocks of 4 calls")
    from omnisift_kernels.ops import chunk_attention as CA

    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 50, 512, generator=g)
    kv = torch.randn(10, 198, 1024, generator=g)
    k, v = kv[..., :512], kv[..., 512:]
    if not CA.kernel_serves(q, k, v, 8):
        print("   the kernel does not serve here (no extension, or no AVX-512 CPU loops)")
        return
    res = _blocks({"kernel": lambda: torch.ops.omnisift.chunk_attention_cpu(q, k, v, None, 8),
                   "sdpa": lambda: CA.heads_attention(q, k, v, None, 8)}, rounds)
    ratio = statistics.median(res["sdpa"]) / statistics.median(res["kernel"])
    print(f"   kernel {_summary(res['kernel'])} | sdpa {_summary(res['sdpa'])} | sdpa/kernel {ratio:.2f}")


def end_to_end(rounds: int, dtype: str = "fp32") -> None:
    print(f"4. end to end, omni7b-20s {dtype} paper-35, round-robin: the fast path as configured (auto), with "
          "OMNISIFT_CPU_GEMM=aten, with OMNISIFT_CPU_OUTPUT_CACHE_MB=0 (no block cache), with "
          "OMNISIFT_CPU_ATTENTION=sdpa, and the release-style loop")
    from omnisift_kernels import compress

    from .cases import CaseFactory
    from .release_loop import release_loop_compress
    from .timing import time_interleaved

    case = CaseFactory().cases("omni7b-20s", dtype, "paper-35", torch.device("cpu"), [0], "same")[0]
    kw = case.kwargs()
    names_env = {"auto": {}, "aten": {"OMNISIFT_CPU_GEMM": "aten"}, "no-cache": {"OMNISIFT_CPU_OUTPUT_CACHE_MB": "0"},
                 "sdpa": {"OMNISIFT_CPU_ATTENTION": "sdpa"}}

    def fast(env):
        def run(_i):
            with _environ(**env):
                compress(**kw, backend="cpu")
        return run

    fns = {n: fast(env) for n, env in names_env.items()}
    fns["release-loop"] = lambda _i: release_loop_compress(**kw)
    # Round-robin with a rotating first provider, as the end-to-end rows of python -m bench.
    timings = time_interleaved(fns, 1, torch.device("cpu"), repeat=rounds)
    loop = timings["release-loop"].median_ms
    for n, t in timings.items():
        print(f"   {n:12s} {_summary(t.samples_ms)} | x release {loop / t.median_ms:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12, help="rounds of each comparison (default 12)")
    ap.add_argument("--skip-e2e", action="store_true", help="only the GEMM, gather and attention comparisons")
    args = ap.parse_args(argv)
    from .env import environment, header_line

    print(header_line(environment(torch.device("cpu"))))
    gemm_libraries(args.rounds)
    hugepage_outputs(args.rounds)
    selector_attention(args.rounds)
    if not args.skip_e2e:
        for dtype in ("fp32", "bf16"):
            end_to_end(args.rounds, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
