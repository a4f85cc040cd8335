"""Build checks: every csrc/**/*.cu compiles with nvcc for sm_80 + sm_90; build_info(); the
pure-Python (no extension) install behaviour."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*.cu"))


def _nvcc() -> str | None:
    return shutil.which("nvcc")


def _nvcc_command(src: Path, out_dir: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    nvcc = _nvcc()
    assert nvcc is not None
    torch_version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    std = "c++20" if torch_version >= (2, 10) else "c++17"  # the same rule as setup.py
    cuda_include = Path(os.path.realpath(nvcc)).parent.parent / "include"
    if not cuda_include.is_dir():  # /usr/local/bin/nvcc may be a wrapper script
        probe = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
        for token in (probe.stdout + probe.stderr).split():
            if token.startswith("-I") and Path(token[2:].strip('"')).joinpath("cuda_runtime.h").exists():
                cuda_include = Path(token[2:].strip('"'))
                break
    cmd = [nvcc, "-c", str(src), "-o", str(out_dir / (src.stem + ".o")), f"-std={std}", "-O3",
           "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-I{ROOT / 'csrc'}",
           f"-I{cuda_include}"]
    cmd += [f"-I{p}" for p in include_paths()]
    # A CPU-only torch wheel ships the c10/cuda headers but not the generated cuda_cmake_macros.h
    # (it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows); this torch-supported
    # switch skips that include. A CUDA torch has the file and the real build includes it.
    torch_include = Path(include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


@pytest.fixture(scope="module")
def nvcc_jobs(tmp_path_factory):
    """Starts one nvcc per .cu file at once (both archs in one call); tests wait for their own."""
    if _nvcc() is None:
        pytest.skip("nvcc not on PATH")
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for src in CU_FILES:
        cmd = _nvcc_command(src, out_dir)
        jobs[src] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                     out_dir / (src.stem + ".o"))
    yield jobs
    for _, proc, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not CU_FILES, reason="no .cu files under csrc/")
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nvcc_compiles(src, nvcc_jobs):
    cmd, proc, obj = nvcc_jobs[src]
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{output[-8000:]}"
    assert obj.exists() and obj.stat().st_size > 0
    # both architectures were generated
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing


def test_build_info_reports_extension():
    import omnisift_kernels
    from omnisift_kernels import _ext

    info = omnisift_kernels.build_info()
    built = list((ROOT / "omnisift_kernels").glob("_C*.so"))
    if not info.extension_loaded and not built:
        try:
            import importlib.util

            spec = importlib.util.find_spec("omnisift_kernels._C")
        except Exception:
            spec = None
        if spec is None:
            pytest.skip("installed without the extension (OMNISIFT_BUILD_EXT=0)")
    assert info.extension_loaded, info.extension_error
    assert info.extension_cpu_kernels
    assert info.extension_cuda_kernels == _ext.ext_has_kernel("varlen_compact", "CUDA")
    if torch.version.cuda is None:
        assert not info.extension_cuda_kernels
    assert "extension cpu" in info.summary()
    assert info.extension_cpu_isa in ("base", "avx2", "avx512")
    # One op per C++ file (csrc/<file>: its op): each file's CPU registration made it into the module.
    for op in ("varlen_compact", "varlen_scatter", "varlen_gather",  # varlen.cpp
               "video_scores_cpu", "video_keep_gather_cpu",  # video_scores_cpu.cpp
               "all_finite_cpu",  # finite_cpu.cpp
               "segmented_topk_mask_cpu",  # topk_cpu.cpp
               "build_plan_cpu",  # plan_cpu.cpp
               "index_plan_cpu",  # index_plan_cpu.cpp
               "chunk_attention_cpu"):  # chunk_attention_cpu.cpp
        assert _ext.ext_has_kernel(op, "CPU"), op
    assert torch.ops.omnisift.cpu_kernels_isa() == info.extension_cpu_isa  # cpu_dispatch.cpp


def test_cmake_builds_every_cpp_source():
    """CMakeLists.txt's OMNISIFT_SOURCES names every C++ file under csrc/ (a file left out would build
    without error and its ops would silently be missing)."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    start = cmake.index("set(OMNISIFT_SOURCES")
    listed = set(cmake[start:cmake.index(")", start)].split()[1:])
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cpp")}
    assert on_disk == listed, (sorted(on_disk - listed), sorted(listed - on_disk))


NO_EXT_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["omnisift_kernels._C"] = None  # what an OMNISIFT_BUILD_EXT=0 install looks like
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import omnisift_kernels
        from omnisift_kernels.ops import varlen as V
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert "omnisift_kernels._C" in str(runtime[0].message), str(runtime[0].message)
    info = omnisift_kernels.build_info()
    assert not info.extension_loaded and not info.extension_cpu_kernels and not info.extension_cuda_kernels
    assert info.extension_cpu_isa is None
    assert "extension none" in info.summary(), info.summary()

    import torch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 6, generator=g).to(torch.bfloat16)
    keep = torch.rand(3, 11, generator=g) > 0.5
    keep[1] = False
    pos = torch.randint(0, 99, (3, 3, 11), generator=g)
    labels = torch.randint(0, 99, (3, 11), generator=g)
    r = V.varlen_compact(x, keep, position_ids=pos, labels=labels)
    flat = keep.flatten()
    assert torch.equal(r.packed, x.flatten(0, 1)[flat])
    assert torch.equal(r.indices, flat.nonzero().flatten())
    assert r.cu_seqlens.tolist() == [0] + keep.sum(1).cumsum(0).tolist()
    assert r.max_seqlen == int(keep.sum(1).max())
    assert torch.equal(r.position_ids, pos.flatten(1)[:, flat]) and torch.equal(r.labels, labels.flatten()[flat])
    r2 = V.varlen_compact(x, keep, total=int(keep.sum()))
    assert torch.equal(r2.packed, r.packed)
    p = V.varlen_pad(x, keep, side="left", labels=labels)
    assert torch.equal(p.padded.flatten(0, 1)[p.pad_indices], r.packed)
    assert torch.equal(V.varlen_scatter(r.packed, r.indices, 3, 11), torch.where(keep[..., None], x, 0))
    xd = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: V.varlen_compact(t, keep[:2, :4]).packed, (xd,))
    print("NO-EXT-OK")
    """
)


def test_without_extension_subprocess():
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "default"
    proc = subprocess.run([sys.executable, "-c", NO_EXT_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "NO-EXT-OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
