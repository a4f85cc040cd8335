"""bench.aot: every Triton kernel of the package compiles for sm_80/sm_90 ahead of time (no GPU),
without spills at the default configurations. Runs ``python -m bench.aot`` in a subprocess without
``TRITON_INTERPRET`` (the interpreter's kernels cannot be compiled)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "bench.aot", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def _jit_kernels_in_sources() -> set[str]:
    names = set()
    for path in (ROOT / "omnisift_kernels").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", text):
            names.add(m.group(1))
            assert "triton_kernels" in path.parts, f"{path}: kernels live in omnisift_kernels/triton_kernels"
    return names


def test_every_kernel_is_reached_by_the_launcher_sweep():
    proc = _run("--list", "--quick")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    listed = {line.split()[0] for line in proc.stdout.splitlines()[1:] if line.startswith("  ")}
    assert _jit_kernels_in_sources() <= listed, (sorted(_jit_kernels_in_sources()), sorted(listed))


def test_default_configurations_compile_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    # omni7b-20s's shapes in bf16 (--quick), about 40 s on CI's two cores; every configuration is
    # in the committed table (bench/results/aot/).
    proc = _run("--quick", "--no-cuda-ext", "--json", str(out))
    text = proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r], text[-6000:]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert _jit_kernels_in_sources() <= {r["kernel"] for r in rows}
    spills = [(r["kernel"], r["config"], r["arch"], r["spill_bytes"]) for r in rows
              if r["spill_bytes"] and r["default"]]
    assert not spills, spills
    for r in rows:
        assert 0 < r["registers"] <= 255 and 0 < r["occupancy"] <= 1
