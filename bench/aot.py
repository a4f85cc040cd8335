"""``python -m bench.aot``: every Triton kernel of the package compiled ahead of time for sm_80 and
sm_90 (no GPU needed), with its registers, spills, shared memory and a static occupancy estimate.

Usage::

    python -m bench.aot                              # every configuration, sm_80 + sm_90, + the CUDA extension
    python -m bench.aot --json bench/results/aot.json
    python -m bench.aot --quick                      # the default configurations in bf16 only (the test)
    python -m bench.aot --arch 90 --kernel _cosine_kernel --no-cuda-ext

How the configurations are found: the launchers of :mod:`omnisift_kernels.triton_kernels` are
called on ``meta`` tensors (shapes only, no data, no device) over a sweep of shapes and dtypes,
with every ``@triton.jit`` kernel of the package replaced by a recorder. Each recorded launch is
exactly what the launcher would run on a GPU: its block sizes come from the launcher's own rules
(a ``meta`` tensor is not a CPU tensor, so the GPU branch of each rule is taken), its constexpr
modes, ``num_warps`` and the argument types. The signature is specialised as the JIT does
(``native_specialize_impl``: integers equal to 1 become constexprs, multiples of 16 and pointers
get the divisibility hint). Each distinct launch is then compiled with ``triton.compile(ASTSource,
target=GPUTarget("cuda", arch, 32))`` and its cubin read with the wheel's bundled ``cuobjdump
--dump-resource-usage`` (the system ptxas may be too old for Triton's PTX).

Columns: registers per thread; spills = bytes of spill stores per thread (where cuobjdump shows a
stack frame or local memory, the same ptxas Triton used for that arch is run again on the PTX with
``-v`` to tell spills from a stack frame; Triton uses the wheel's ptxas 12.9 for sm_80 and
``ptxas-blackwell`` 13.x for sm_90a); shared = Triton's dynamic shared memory plus the static ``SHARED``; occupancy =
resident warps per SM / 64 from registers (allocated per warp in units of 256), shared memory
(164 KiB on sm_80, 228 KiB on sm_90, 1 KiB reserved per block), 32 blocks and 64 warps per SM.

"default" marks configurations the launchers choose at the model shapes (Qwen2.5-Omni 3B/7B,
``D`` 2048/3584, the ``omni*`` workloads' frame and chunk counts). Exit status 1 when a compile
fails or a default configuration spills (spills elsewhere are listed as warnings).

The CUDA extension (``csrc/*.cu``) is compiled with the system nvcc and ``-Xptxas -v`` for sm_80
and sm_90 and its kernels' registers and spills listed too (skipped without nvcc; ``--no-cuda-ext``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_PACKAGE = "omnisift_kernels.triton_kernels"
ARCHS = (80, 90)
DTYPE_NAMES = ("fp32", "bf16", "fp16", "fp64")
DEFAULT_DTYPES = ("fp32", "bf16", "fp16")
# Per-SM limits of the static occupancy estimate (CUDA occupancy calculator figures).
SM_LIMITS = {
    80: dict(regs=65536, warps=64, blocks=32, smem=164 * 1024),
    90: dict(regs=65536, warps=64, blocks=32, smem=228 * 1024),
}
# Model shapes: hidden sizes of Qwen2.5-Omni-3B / 7B; (frames, tokens per frame) of the workloads
# omni7b-20s (20 x 13*23), omni7b-120s (120 x 299) and omni7b-600s (600 x 9*16).
MODEL_D = (2048, 3584)
MODEL_FRAMES = ((20, 299), (120, 299), (600, 144))
# Audio: 25 tokens/s in 2-second chunks (50 per chunk), clips of 20 s / 120 s / 600 s.
MODEL_AUDIO = ((10, 50), (60, 50), (300, 50))
D_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3584, 4096, 8192)
S_SWEEP = (1, 1024)
N_SWEEP = tuple(2**i for i in range(0, 15)) + (100_000,)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}[name]


# ----------------------------------------------------------------------------------------------
# Kernels and launches


def package_jit_functions() -> dict[str, object]:
    """Every ``@triton.jit`` function defined in the kernel package: ``{"module:name": fn}``."""
    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(KERNEL_PACKAGE)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for name, value in vars(mod).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == mod.__name__:
                found[f"{mod.__name__}:{name}"] = value
    return found


def package_kernels() -> dict[str, object]:
    """The launchable kernels (names ending in ``_kernel``; the rest are device helpers)."""
    return {k: v for k, v in package_jit_functions().items() if k.endswith("_kernel")}


@dataclasses.dataclass
class Launch:
    kernel: str                # "module:name"
    signature: dict            # name -> type or "constexpr"
    constexprs: dict           # name -> value
    attrs: dict                # (index,) -> [["tt.divisibility", 16]]
    options: dict              # num_warps, num_stages, enable_fp_fusion, ...
    dtype: str                 # the embeddings' / scores' dtype
    default: bool = False
    shapes: list = dataclasses.field(default_factory=list)
    ones: tuple = ()           # integer arguments equal to 1 (constexprs by specialisation)

    def key(self):
        """What makes two launches one row: the kernel, dtype, constexprs and options. Launches that
        differ only in the divisibility hints of their integers (which depend on the shape) are one
        row (the first seen, a default one where there is one); outside the default configurations
        the binary search's unroll count ``N_ITERS`` is not a row of its own either."""
        skip = () if self.default else ("N_ITERS",)
        return (self.kernel, self.dtype, self.ones,
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items() if k not in skip)),
                tuple(sorted(self.options.items())))

    def config(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items() if k not in self.ones and k != "EPS"]
        if self.ones:
            parts.append("1:" + ",".join(self.ones))
        parts.append(f"w{self.options.get('num_warps', 4)}")
        return " ".join(parts)


_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


def _launch_from_call(kernel_id, fn, args, kwargs, dtype) -> Launch:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = fn.arg_names
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
    signature, constexprs, attrs, ones = {}, {}, {}, []
    for i, p in enumerate(fn.params):
        if p.name not in bound:
            if p.has_default:
                bound[p.name] = p.default
            else:
                raise TypeError(f"bench.aot: {kernel_id}: argument {p.name} not given")
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ty, attr = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":  # an integer equal to 1, specialised as the JIT does
            signature[p.name] = "constexpr"
            constexprs[p.name] = attr
            ones.append(p.name)
            continue
        signature[p.name] = ty
        if isinstance(attr, str):
            parsed = BaseBackend.parse_attr(attr)
            if parsed:
                attrs[(i,)] = parsed
    options = {k: v for k, v in kwargs.items() if k in _OPTION_KEYS}
    options.setdefault("num_warps", 4)
    options.setdefault("enable_fp_fusion", True)  # Triton 3.9's default, stated (silences its warning)
    return Launch(kernel_id, signature, constexprs, attrs, options, dtype, ones=tuple(ones))


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel_id, fn, sink, state):
        self.kernel_id, self.fn, self.sink, self.state = kernel_id, fn, sink, state

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(_launch_from_call(self.kernel_id, self.fn, args, kwargs, self.state["dtype"]))
            self.sink[-1].default = self.state["default"]
            self.sink[-1].shapes.append(self.state["shape"])
        return launch


@contextlib.contextmanager
def recording(sink: list, state: dict):
    """Replaces every kernel of the package by a :class:`_Recorder` (restored on exit)."""
    saved = []
    for kernel_id, fn in package_kernels().items():
        mod_name, name = kernel_id.split(":")
        mod = sys.modules[mod_name]
        saved.append((mod, name, fn))
        setattr(mod, name, _Recorder(kernel_id, fn, sink, state))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _video_cases(dtypes, quick):
    import torch

    from omnisift_kernels.triton_kernels import video as V
    from omnisift_kernels.triton_kernels.accumulation import ACCUMULATION_MODES as modes

    frames = MODEL_FRAMES[:1] if quick else MODEL_FRAMES
    shapes = [(d, s, s * n, True) for d in MODEL_D for s, n in frames]
    if not quick:
        shapes += [(d, s, s * 16, False) for d in D_SWEEP for s in S_SWEEP]
    for dt in dtypes:
        for D, S, N, default in shapes:
            x = torch.empty((1, N + 8, D), dtype=_torch_dtype(dt), device="meta")
            tok = torch.empty(N, dtype=torch.int64, device="meta")
            off = torch.empty(S + 1, dtype=torch.int64, device="meta")
            for mode in modes:
                kw = {} if mode is None else {"accumulation": mode}
                label = f"D={D} S={S} N={N}" + ("" if mode is None else f" {mode}")
                yield dt, default, label, lambda x=x, tok=tok, off=off, kw=kw: (
                    V.frame_saliency_triton(x, tok, off, **kw),
                    V.frame_pair_similarity_triton(x, tok, tok, **kw),
                    V.video_scores_triton(x, tok, off, tok, **kw))


def _topk_cases(quick):
    import torch

    from omnisift_kernels.triton_kernels import topk as Sel

    shapes = [(s * n, s, True) for s, n in (MODEL_FRAMES[:1] + MODEL_AUDIO[:1] if quick
                                            else MODEL_FRAMES + MODEL_AUDIO)]
    if not quick:
        shapes += [(n, max(1, n // 50), False) for n in N_SWEEP]
    for N, S, default in shapes:
        scores = torch.empty(N, dtype=torch.float32, device="meta")
        off = torch.empty(S + 1, dtype=torch.int64, device="meta")
        k = torch.empty(S, dtype=torch.int64, device="meta")
        yield "fp32", default, f"N={N} S={S}", lambda scores=scores, off=off, k=k: (
            Sel.segmented_topk_mask_triton(scores, off, k))


def _gather_cases(dtypes, quick):
    import torch

    from omnisift_kernels.triton_kernels import gather as G

    shapes = [(d, 2000, True) for d in MODEL_D]
    if not quick:
        shapes += [(d, 64, False) for d in D_SWEEP]
    for dt in dtypes:
        for D, T, default in shapes:
            x = torch.empty((1, 2 * T, D), dtype=_torch_dtype(dt), device="meta")
            idx = torch.empty(T, dtype=torch.int64, device="meta")
            g = torch.empty((T, D), dtype=_torch_dtype(dt), device="meta")

            def call(x=x, idx=idx, g=g, dt=dt):
                G.gather_rows_triton(x, idx)
                if dt != "fp64":  # the op sends fp64 backward to its torch path
                    G.gather_ste_backward_triton(g, x, idx, torch.float32)
            yield dt, default, f"D={D} T={T}", call


def _check_cases():
    import torch

    from omnisift_kernels.triton_kernels import check as C

    sizes = torch.empty(C.NUM_SIZES, dtype=torch.int64, device="meta")
    violations = torch.empty(C.NUM_VIOLATIONS, dtype=torch.int64, device="meta")
    yield "int64", True, "plan sizes", lambda: C.grid_matches(sizes, violations, [2] * C.NUM_SIZES)


def collect_launches(dtypes=DEFAULT_DTYPES, quick=False, kernels=None) -> list[Launch]:
    """Every distinct launch the launchers choose over the sweep (defaults first)."""
    sink: list[Launch] = []
    state = {"dtype": None, "default": False, "shape": None}
    cases = [*_video_cases(dtypes, quick), *_topk_cases(quick), *_gather_cases(dtypes, quick),
             *_check_cases()]
    with recording(sink, state):
        for dt, default, label, call in cases:
            state.update(dtype=dt, default=default, shape=label)
            call()
    unique: dict = {}
    for launch in sink:
        if kernels and launch.kernel.split(":")[1] not in kernels:
            continue
        have = unique.get(launch.key())
        if have is None:
            unique[launch.key()] = launch
        else:
            have.default = have.default or launch.default
            have.shapes.extend(s for s in launch.shapes if s not in have.shapes)
    return sorted(unique.values(), key=lambda l: (l.kernel, not l.default, l.dtype, l.config()))


# ----------------------------------------------------------------------------------------------
# Compilation and resource usage


def bundled_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"bench.aot: the Triton wheel has no {path}")
    return str(path)


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([bundled_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"bench.aot: cannot parse cuobjdump output:\n{out}")
    return dict(registers=int(m.group(2)), stack=int(m.group(3)), static_shared=int(m.group(4)),
                local=int(m.group(5)))


def ptxas_spills(ptx: str, arch: int, fp_fusion: bool) -> tuple[int, int]:
    """``(spill store bytes, spill load bytes)`` from the ptxas Triton itself uses for ``arch`` (the
    wheel's; ``-v``), run again on the kernel's PTX: a stack frame alone is not a spill."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               *([] if fp_fusion else ["--fmad=false"]), f"--gpu-name={sm_arch_from_capability(arch)}",
               str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def occupancy(arch: int, registers: int, shared: int, warps: int) -> float:
    """Resident warps per SM / max warps, from registers, shared memory and the block limits."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(lim["blocks"], lim["warps"] // warps, (lim["regs"] // per_warp) // warps)
    if shared:
        blocks = min(blocks, lim["smem"] // (shared + 1024))
    return blocks * warps / lim["warps"]


def _compile_one(job) -> dict:
    launch, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, name = launch.kernel.split(":")
    fn = getattr(importlib.import_module(mod_name), name)
    row = dict(kernel=name, module=mod_name, dtype=launch.dtype, config=launch.config(), arch=f"sm_{arch}",
               default=launch.default, shapes=launch.shapes[:2],
               constexprs={k: v for k, v in launch.constexprs.items()}, options=launch.options)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
        res = resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # a compile failure is a result, reported in the table
        row.update(error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}")
        return row
    shared = int(compiled.metadata.shared) + res["static_shared"]
    warps = int(launch.options.get("num_warps", 4))
    stores = loads = 0
    if res["stack"] or res["local"]:
        stores, loads = ptxas_spills(compiled.asm["ptx"], arch, launch.options["enable_fp_fusion"])
        stores = stores or res["local"]  # local arrays would show here (none expected)
    row.update(registers=res["registers"], spill_bytes=stores, spill_loads=loads, stack=res["stack"],
               local=res["local"], shared=shared, num_warps=warps,
               occupancy=round(occupancy(arch, res["registers"], shared, warps), 4),
               compile_s=round(time.perf_counter() - t0, 2))
    return row


def compile_all(launches, archs, jobs: int) -> list[dict]:
    work = [(launch, arch) for launch in launches for arch in archs]
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work))


# ----------------------------------------------------------------------------------------------
# The CUDA extension (nvcc -Xptxas -v)


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def cuda_ext_usage(archs) -> tuple[list[dict], str | None]:
    """Registers and spills of every kernel of ``csrc/*.cu`` per arch (``[]`` and a reason when
    nvcc is missing or fails)."""
    nvcc = nvcc_path()
    if nvcc is None:
        return [], "nvcc not on PATH: the CUDA extension's kernels were not compiled"
    import torch
    from torch.utils.cpp_extension import include_paths

    rows = []
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    torch_mm = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    std = "c++20" if torch_mm >= (2, 10) else "c++17"  # setup.py's rule
    for src in sorted((REPO_ROOT / "csrc").rglob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "-c", str(src), "-o", str(Path(tmp) / "x.o"), f"-std={std}", "-O3", "-Xcompiler", "-fPIC",
                   "--expt-relaxed-constexpr", "-Xptxas", "-v", "-DTORCH_API_INCLUDE_EXTENSION_H",
                   "-DTORCH_EXTENSION_NAME=_C", f"-I{REPO_ROOT / 'csrc'}"]
            for arch in archs:
                cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            cmd += [f"-I{p}" for p in include_paths()]
            if not (Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
                cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU-only torch wheel (see tests/test_build.py)
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return rows, f"nvcc failed on {src.name}:\n{proc.stderr[-4000:]}"
        rows += _parse_ptxas_v(proc.stdout + proc.stderr, src.name)
    for row in rows:
        row["nvcc"] = version[-1] if version else nvcc
    return rows, None


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _parse_ptxas_v(log: str, source: str) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = dict(source=source, mangled=m.group(1), arch=m.group(2), registers=None,
                       spill_stores=0, spill_loads=0, stack=0, shared=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["shared"] = int(s.group(1)) if s else 0
    for row, name in zip(rows, _demangle([r["mangled"] for r in rows])):
        row["kernel"] = name
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "dtype", "config", "arch", "regs", "spills", "shared", "occup.", "default")
    body = []
    for r in rows:
        if "error" in r:
            body.append((r["kernel"], r["dtype"], r["config"], r["arch"], "FAILED", "-", "-", "-",
                         "yes" if r["default"] else ""))
        else:
            body.append((r["kernel"], r["dtype"], r["config"], r["arch"], str(r["registers"]),
                         str(r["spill_bytes"]), str(r["shared"]), f"{100 * r['occupancy']:.0f}%",
                         "yes" if r["default"] else ""))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


def format_ext_table(rows: list[dict]) -> str:
    lines = ["CUDA extension (nvcc -Xptxas -v): kernel, arch, registers, spill stores/loads (bytes), "
             "stack, smem"]
    for r in rows:
        lines.append(f"  {r['kernel'][:90]:<90} {r['arch']}  regs {r['registers']:>3}  spills "
                     f"{r['spill_stores']}/{r['spill_loads']}  stack {r['stack']}  smem {r['shared']}")
    return "\n".join(lines)


def _environment() -> dict:
    import torch
    import triton

    from bench.env import git_commit

    return dict(triton=triton.__version__, torch=torch.__version__, commit=git_commit(),
                python=sys.version.split()[0], command="python -m bench.aot " + " ".join(sys.argv[1:]))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=ARCHS, help="repeatable; default 80 and 90")
    ap.add_argument("--dtype", action="append", choices=DTYPE_NAMES,
                    help="embedding dtypes (repeatable; default fp32, bf16, fp16; the top-k scores are fp32)")
    ap.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    ap.add_argument("--quick", action="store_true",
                    help="only the default configurations at omni7b-20s's shapes (20 frames, 10 audio chunks; "
                         "D 2048/3584), bf16 unless --dtype")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--json", metavar="PATH", help="write every row (and the environment) as JSON")
    ap.add_argument("--no-cuda-ext", action="store_true", help="skip the nvcc -Xptxas -v part")
    ap.add_argument("--list", action="store_true", help="list the kernels and their launches; compile nothing")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Under the interpreter @triton.jit gives interpreted functions, which do not compile:
        # run again in a clean process (the library itself never touches the environment).
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "bench.aot", *argv], env=env).returncode
    args = build_parser().parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    dtypes = tuple(args.dtype or (("bf16",) if args.quick else DEFAULT_DTYPES))
    t0 = time.perf_counter()
    kernels = package_kernels()
    launches = collect_launches(dtypes, args.quick, args.kernel)
    covered = {l.kernel for l in launches}
    missing = [k for k in kernels if k not in covered and (not args.kernel or k.split(":")[1] in args.kernel)]
    print(f"bench.aot: {len(kernels)} kernels in {KERNEL_PACKAGE} "
          f"({', '.join(k.split(':')[1] for k in kernels)}), {len(launches)} distinct launches, "
          f"archs {', '.join(f'sm_{a}' for a in archs)}, dtypes {', '.join(dtypes)}", flush=True)
    if args.list:
        for l in launches:
            print(f"  {l.kernel.split(':')[1]:<24} {l.dtype:<5} {l.config():<60} "
                  f"{'default' if l.default else ''}  e.g. {l.shapes[0]}")
        return 1 if missing else 0
    rows = compile_all(launches, archs, args.jobs)
    print(format_table(rows))
    status = 0
    if missing:
        print(f"bench.aot: FAILED: kernels no launcher sweep reached: {missing}")
        status = 1
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"bench.aot: FAILED to compile {r['kernel']} {r['dtype']} {r['config']} {r['arch']}:\n"
              f"  {r['error'][:1500]}")
        status = 1
    spills = [r for r in rows if "error" not in r and r["spill_bytes"] > 0]
    for r in spills:
        what = "FAILED: default configuration spills" if r["default"] else "warning: spills"
        print(f"bench.aot: {what}: {r['kernel']} {r['dtype']} {r['config']} {r['arch']} "
              f"({r['spill_bytes']} bytes per thread)")
        if r["default"]:
            status = 1
    ext_rows, ext_note = [], None
    if not args.no_cuda_ext and not args.kernel:
        ext_rows, ext_note = cuda_ext_usage(archs)
        if ext_rows:
            print(format_ext_table(ext_rows))
        if ext_note:
            print(f"bench.aot: {ext_note}")
        for r in ext_rows:
            if r["spill_stores"] or r["spill_loads"]:
                print(f"bench.aot: warning: the CUDA extension's {r['kernel']} spills on {r['arch']}")
    ok = len(rows) - len(failed)
    print(f"bench.aot: {ok}/{len(rows)} compiled, {len(failed)} failed, {len(spills)} spilling "
          f"({sum(r['default'] for r in spills)} at default configurations), "
          f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(environment=_environment(), archs=[f"sm_{a}" for a in archs], dtypes=list(dtypes),
                           kernels=[k.split(":")[1] for k in kernels], rows=rows,
                           cuda_extension=dict(rows=ext_rows, note=ext_note)), f, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main())
