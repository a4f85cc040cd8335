"""The OmniSIFT benchmark suite: ``python -m bench`` (``make bench``).

Usage::

    python -m bench                                   # omni7b-20s, paper-35 + paper-25, fp32+bf16 (CPU) / bf16 (CUDA)
    python -m bench --quick                           # seconds: tiny workload, one dtype/preset, small repeats
    python -m bench --workload omni7b-120s --workload omni7b-batch8 --provider cpu --provider reference
    python -m bench --op gather --op e2e --dtype bf16 --repeat 20
    python -m bench --provider compile-reference      # torch.compile of the reference (slow to compile)
    python -m bench --scaling                         # + time / peak memory vs clip length, 10 s .. 600 s
    python -m bench --json out.json --plot out_dir    # every row as JSON; PNGs (runs the scaling section)
    python -m bench compare A.json B.json [--threshold 1.1]   # exit 1 if a row of B is >10% slower than A

What one run does:

1. A one-line summary: device, torch/Triton/CUDA versions, ``build_info().summary()``, git commit.
2. The copy bandwidth of the device (``dst.copy_(src)``, 256 MiB on CPU / 1 GiB on CUDA).
3. For every workload x dtype x preset: the reference result (kept tokens, retention), then for
   every available provider (:mod:`bench.providers`) its keep mask is checked against the
   reference's on every input set; a mismatch is reported and not timed. Then each stage
   (:mod:`bench.stages`) and the whole call are timed (:mod:`bench.timing`: warm-up excluded, two
   input sets rotated, CUDA events / ``triton.testing.do_bench`` on GPU, ``perf_counter`` on CPU,
   median and p20/p80), plus the ``selector-projections floor`` (the two selector matmuls).
4. ONE table: median, p20-p80, GB/s of the minimal traffic, % of the copy bandwidth for
   memory-bound stages, speedup vs the release-style loop (:mod:`bench.release_loop`), kept tokens
   and retention; then the acceptance check (omni7b-20s retention must read 35.19% / 25.15%).

Exit status: 0; 1 if a provider disagreed with the reference or raised, or the retention check
failed (the table and JSON are still written).
"""
