"""Where a benchmark runs: device, library versions, build info and the git commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda was requested but no CUDA device is available")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The VM behind "this CPU" changes between runs (AVX2-only or AVX-512 with bf16 seen): say which
    # vector ISA torch dispatches to, and whether oneDNN has bf16 GEMM, since both move the figures.
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        extra = f" {isa} " + ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no-bf16")
    except (AttributeError, RuntimeError):  # builds without oneDNN
        extra = f" {isa}"
    return f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}{extra}"


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def git_commit() -> str:
    """Short hash of HEAD, ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def build_summary() -> str:
    try:
        from omnisift_kernels import build_info

        return build_info().summary()
    except Exception as exc:  # the package itself failing to import is worth a line, not a crash
        return f"build_info unavailable ({type(exc).__name__}: {exc})"


def cpu_choices() -> str:
    """The fast path's CPU choices in force: the selector's GEMM library and half precision handling
    (omnisift_kernels.cpu_gemm), the extension's cache of freed blocks and its huge pages
    (csrc/cpu_alloc.h)."""
    try:
        from omnisift_kernels.cpu_gemm import gemm_policy

        pol = gemm_policy()
        gemm = f"cpu gemm {pol['fp32']}, half {pol['half']}"
    except Exception as exc:
        gemm = f"cpu gemm unknown ({type(exc).__name__})"
    hp = os.environ.get("OMNISIFT_CPU_HUGEPAGES", "1") not in ("0", "false", "off")  # as csrc/cpu_alloc.h
    try:  # the limit in force (csrc/cpu_alloc.h: the variable, else 1/16 of the memory)
        from omnisift_kernels._ext import EXT_AVAILABLE

        if EXT_AVAILABLE:
            limit = torch.ops.omnisift.cpu_output_cache_limit()
            cache = f"{limit >> 20} MiB" if limit > 0 else "off"
        else:
            cache = "none (no extension)"
    except (AttributeError, RuntimeError):
        cache = "unavailable"
    return f"{gemm} | block cache {cache} | hugepages {'on' if hp else 'off'}"


def environment(device: torch.device) -> dict:
    """The fields every JSON row carries."""
    return {
        "device": str(device),
        "cpu_choices": cpu_choices() if device.type == "cpu" else None,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def header_line(env: dict) -> str:
    """The one-line summary printed on top of the table."""
    return (
        f"device {env['device_name']} ({env['device']}) | torch {env['torch']} | triton {env['triton']} | "
        f"CUDA {env['cuda']} | commit {env['commit']} | {build_summary()}"
        + (f" | {env['cpu_choices']}" if env.get("cpu_choices") else "")
    )
