"""Builds the extension ``omnisift_kernels._C`` with CMake + Ninja against the installed torch.

Metadata lives in pyproject.toml; this file only adds the extension. Install with
``pip install --no-build-isolation [-e] .`` (torch must already be installed).

Environment:
    OMNISIFT_BUILD_EXT=0     install the pure-Python package, without the extension (every op then
                             runs through its PyTorch fallback; the package warns once on import).
    OMNISIFT_FORCE_CUDA=1    compile the CUDA kernels even if torch.version.cuda is None or nvcc is not
                             found on PATH / CUDA_HOME (e.g. building a CUDA image without a GPU).
                             OMNISIFT_FORCE_CUDA=0 disables them.
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0", i.e. sm_80 and sm_90).
    MAX_JOBS                 parallel compile jobs (default: the number of CPUs).
    OMNISIFT_BUILD_TYPE      CMake build type (default Release, -O3).
    OMNISIFT_SANITIZE        e.g. "address,undefined": compile and link the extension with
                             -fsanitize=<value> (-O1 -g, its own build tree build/cmake-...-sanitize);
                             `make test-asan` uses it with `build_ext --build-lib`, never in place.
    CMAKE_ARGS               extra arguments for the CMake configure step.

Flags: -O3; C++20 for torch >= 2.10 (its headers use C++20 features, as does torch.utils.cpp_extension),
else C++17. Build tree: build/cmake-<platform>-<python tag>/. The module is written to
``self.get_ext_fullpath(...)`` (in the source tree for editable installs, PEP 660).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() not in ("0", "false", "off", "no")


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import torch
        import torch.utils

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        sanitize = os.environ.get("OMNISIFT_SANITIZE", "").strip()
        build_temp = ROOT / "build" / (f"cmake-{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
                                       + ("-sanitize" if sanitize else ""))
        build_temp.mkdir(parents=True, exist_ok=True)

        nvcc = _find_nvcc()
        force = _env_flag("OMNISIFT_FORCE_CUDA")
        with_cuda = force if force is not None else (torch.version.cuda is not None and nvcc is not None)
        torch_major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
        cxx_std = "20" if torch_major_minor >= (2, 10) else "17"

        env = os.environ.copy()
        env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        build_type = env.get("OMNISIFT_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DOMNISIFT_OUTPUT_DIR={out_path.parent}",
            f"-DOMNISIFT_OUTPUT_NAME={out_path.name}",
            f"-DOMNISIFT_CXX_STANDARD={cxx_std}",
            f"-DOMNISIFT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
        ]
        if with_cuda and nvcc is not None:
            cmake_args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja") or _ninja_from_package():
            cmake_args += ["-G", "Ninja"]
            ninja = shutil.which("ninja") or _ninja_from_package()
            cmake_args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if sanitize:
            flags = f"-fsanitize={sanitize} -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
            cmake_args += [f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS_RELEASE=-O1",
                           f"-DCMAKE_MODULE_LINKER_FLAGS=-fsanitize={sanitize}"]
        cmake_args += shlex.split(env.get("CMAKE_ARGS", ""))

        jobs = env.get("MAX_JOBS") or str(os.cpu_count() or 1)
        cmake = shutil.which("cmake") or "cmake"
        print(f"[omnisift] building {ext.name}: cuda={'on' if with_cuda else 'off'} "
              f"(arch list {env['TORCH_CUDA_ARCH_LIST'] if with_cuda else '-'}), C++{cxx_std}, jobs={jobs}, "
              f"build dir {build_temp}", flush=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *cmake_args], check=True, env=env)
        subprocess.run([cmake, "--build", str(build_temp), "--parallel", jobs], check=True, env=env)
        if not out_path.exists():
            raise RuntimeError(f"CMake did not produce {out_path}")


def _ninja_from_package() -> str | None:
    try:
        import ninja  # type: ignore[import-not-found]
    except Exception:
        return None
    path = Path(ninja.BIN_DIR) / "ninja"
    return str(path) if path.exists() else None


build_ext_enabled = _env_flag("OMNISIFT_BUILD_EXT")
ext_modules = [] if build_ext_enabled is False else [CMakeExtension("omnisift_kernels._C")]
if build_ext_enabled is False:
    # An editable install imports from the source tree: a module left there by an earlier build
    # would still load, so an install without the extension removes it.
    for stale in (ROOT / "omnisift_kernels").glob("_C*.so"):
        print(f"[omnisift] OMNISIFT_BUILD_EXT=0: removing {stale}", flush=True)
        stale.unlink()

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
