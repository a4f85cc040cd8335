#!/usr/bin/env bash
# make test-asan: the C++ extension built with AddressSanitizer + UndefinedBehaviorSanitizer, and the
# op, pipeline, bad-input and block-cache tests run against it (the CPU paths; no Triton interpreter).
#
# The sanitized module goes to build/asan/omnisift_kernels/ beside a copy of the package's Python
# files, never over the regular build; PYTHONPATH puts that copy first. The ASan runtime is preloaded
# (Python itself is not instrumented); leak detection is off (the interpreter keeps memory at exit).
# Any ASan or UBSan report aborts the process, so the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=build/asan
rm -rf "$OUT"
mkdir -p "$OUT"
echo "[asan] building the extension with -fsanitize=address,undefined"
OMNISIFT_SANITIZE=address,undefined OMNISIFT_FORCE_CUDA=0 "$PY" setup.py -q build_ext --build-lib "$OUT" \
  >build/asan-build.log 2>&1 || { tail -40 build/asan-build.log; exit 1; }
# The package's Python files next to the sanitized module.
(cd omnisift_kernels && find . -name '*.py' -print0 | xargs -0 -I{} install -D -m 644 {} "../$OUT/omnisift_kernels/{}")
ASAN_LIB=$(${CC:-gcc} -print-file-name=libasan.so)
UBSAN_LIB=$(${CC:-gcc} -print-file-name=libubsan.so)
export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:detect_odr_violation=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$PWD/$OUT${PYTHONPATH:+:$PYTHONPATH}"
ROOT=$PWD
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac
cd "$OUT"  # python -m puts the working directory first on sys.path: the sanitized copy
"$PY" - <<'PY'
import omnisift_kernels, omnisift_kernels._ext as e
assert "build/asan" in omnisift_kernels.__file__, omnisift_kernels.__file__
assert e.EXT_AVAILABLE, e.EXT_ERROR
print("[asan] testing", omnisift_kernels.__file__)
PY
start=$(date +%s)
T=$ROOT/tests
"$PY" -m pytest -q -p no:cacheprovider --benchmark-disable -m "not slow" --rootdir "$ROOT" \
  "$T/test_ops_video.py" "$T/test_ops_topk.py" "$T/test_ops_gather.py" "$T/test_varlen.py" \
  "$T/test_video_scores_cpu.py" "$T/test_chunk_attention.py" "$T/test_cpu_gemm.py" "$T/test_pipeline.py" "$T/test_plan.py" \
  "$T/test_golden.py" "$T/test_bad_inputs.py" "$T/test_block_cache_threads.py" "$@"
echo "[asan] clean: no AddressSanitizer or UndefinedBehaviorSanitizer report ($(( $(date +%s) - start )) s of tests)"
