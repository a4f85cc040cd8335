"""The benchmark CLI end to end: ``python -m bench --quick`` and ``python -m bench compare``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_FIELDS = {"op", "provider", "workload", "dtype", "preset", "median_ms", "p20_ms", "p80_ms", "gbps",
              "device_name", "torch", "triton", "cuda", "commit", "timestamp", "status"}


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)  # the CLI times real devices, not the interpreter
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out = d / "out.json"
    plots = d / "plots"
    p = _run("--quick", "--threads", "1", "--no-progress", "--device", "cpu", "--json", str(out), "--plot", str(plots))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, out, plots


def test_quick_table_and_json(quick_run):
    p, out, _ = quick_run
    assert "median ms" in p.stdout and "end_to_end" in p.stdout
    assert "commit" in p.stdout.splitlines()[0]  # the one-line summary on top
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert rows
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
    timed = [r for r in rows if r["status"] == "ok" and r["op"] == "end_to_end"]
    providers = {r["provider"] for r in timed}
    assert {"reference", "release-loop"} <= providers
    for r in timed:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["kept_tokens"] and 0 < r["retention_pct"] <= 100
    assert any(r["op"] == "selector-projections floor" for r in rows)
    # on the CPU a second floor row with the library's GEMM choice, and the choices in the header
    assert any(r["op"] == "selector-projections floor" and r["provider"].startswith("cpu_gemm x2") for r in rows)
    assert "cpu gemm" in p.stdout.splitlines()[0] and "block cache" in p.stdout.splitlines()[0]
    assert all(r.get("timing") == "interleaved" for r in timed)
    # compile-reference is reported, not run, unless asked for
    assert any(r["provider"] == "compile-reference" and r["status"] == "skipped" for r in rows)
    assert data["meta"]["scaling"], "--plot runs the scaling section"


def test_quick_plots(quick_run):
    _, _, plots = quick_run
    pngs = sorted(os.listdir(plots))
    assert "scaling.png" in pngs
    assert any(n.startswith("stages_") for n in pngs)
    for n in pngs:
        with open(plots / n, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_self_is_clean(quick_run):
    _, out, _ = quick_run
    p = _run("compare", str(out), str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no regression" in p.stdout


def test_compare_flags_2x_slower(quick_run, tmp_path):
    _, out, _ = quick_run
    data = json.loads(out.read_text())
    for r in data["rows"]:
        if r.get("median_ms"):
            for k in ("median_ms", "p20_ms", "p80_ms"):
                r[k] *= 2
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(data))
    p = _run("compare", str(out), str(slow), "--threshold", "1.1")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "REGRESSION" in p.stdout
    # the other way round it is faster, not a regression
    assert _run("compare", str(slow), str(out)).returncode == 0


def test_compile_reference_provider_runs():
    """``--provider compile-reference`` (off by default because compiling is slow) really times
    ``torch.compile(reference)`` and agrees with the reference, instead of reporting an error row."""
    p = _run("--quick", "--threads", "1", "--no-progress", "--device", "cpu", "--op", "e2e",
             "--provider", "reference", "--provider", "compile-reference")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if "| compile-reference |" in line]
    assert rows, p.stdout
    for line in rows:
        assert "error" not in line and "skipped" not in line, line
        median = line.split("|")[5].strip()
        assert float(median) > 0, line


def test_time_interleaved_rounds_and_rotation():
    """Every callable once per round on the same input set, the first one rotating; warm-up excluded."""
    sys.path.insert(0, ROOT)
    import torch

    from bench.timing import time_interleaved

    calls = []
    fns = {name: (lambda name: (lambda i: calls.append((name, i))))(name) for name in ("a", "b", "c")}
    t = time_interleaved(fns, 2, torch.device("cpu"), repeat=4)
    assert set(t) == {"a", "b", "c"} and all(v.n == 4 for v in t.values())
    warm, timed = calls[:6], calls[6:]
    assert sorted(warm) == sorted((n, i) for n in "abc" for i in (0, 1))
    rounds = [timed[3 * r:3 * r + 3] for r in range(4)]
    assert [[n for n, _ in r] for r in rounds] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert all({i for _, i in r} == {r_i % 2} for r_i, r in enumerate(rounds))
    assert time_interleaved({}, 1, torch.device("cpu")) == {}


def test_cpu_choices_tool_runs():
    """python -m bench.cpu_choices (the measurements behind the CPU choices' documented figures)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "bench.cpu_choices", "--rounds", "1", "--skip-e2e"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert ("v_proj" in p.stdout and "mkl/onednn" in p.stdout) or "oneDNN linear unavailable" in p.stdout
    assert "huge pages on" in p.stdout or "not built" in p.stdout
    assert "sdpa/kernel" in p.stdout or "does not serve here" in p.stdout


def test_timing_pauses_the_garbage_collector():
    """Timed calls run with the cyclic collector off (as timeit does); it is back on afterwards."""
    import gc

    import torch

    from bench.timing import time_fn, time_interleaved

    seen = []
    assert gc.isenabled()
    time_fn(lambda i: seen.append(gc.isenabled()), 1, torch.device("cpu"), repeat=3)
    time_interleaved({"a": lambda i: seen.append(gc.isenabled())}, 1, torch.device("cpu"), repeat=2)
    # warm-up calls (not timed) with it on, timed calls with it off
    assert seen == [True, False, False, False, True, False, False] and gc.isenabled()


def _row(op, provider, workload, dtype, median, preset="paper-35", loop_ms=None):
    return dict(op=op, provider=provider, workload=workload, dtype=dtype, preset=preset, status="ok",
                median_ms=median, speedup_vs_release=None if loop_ms is None else loop_ms / median)


def test_target_lines_report_met_and_missed():
    from bench.report import target_lines

    rows = [
        _row("end_to_end", "release-loop", "omni7b-20s", "fp32", 150.0),
        _row("end_to_end", "reference", "omni7b-20s", "fp32", 200.0),
        _row("end_to_end", "cpu", "omni7b-20s", "fp32", 70.0, loop_ms=150.0),
        _row("selector-projections floor", "torch F.linear x2", "omni7b-20s", "fp32", 55.0),
        _row("selector-projections floor", "cpu_gemm x2 (onednn, half native)", "omni7b-20s", "fp32", 42.0),
        _row("end_to_end", "release-loop", "omni7b-20s", "bf16", 70.0),
        _row("end_to_end", "cpu", "omni7b-20s", "bf16", 40.0, loop_ms=70.0),
        _row("end_to_end", "cpu", "omni7b-20s", "bf16", 1.0, preset="paper-25"),  # another preset: ignored
    ]
    lines = target_lines(rows, "cpu")
    assert len(lines) == 2, lines
    fp32, bf16 = lines
    assert "2.14x the release-style loop (150 ms; target >= 2x: met)" in fp32
    assert "2.86x the reference (200 ms; target > 1x: met)" in fp32
    assert "projections floor 42.0 ms (cpu path = 1.67x the floor)" in fp32  # the library's GEMM row
    assert "1.75x the release-style loop (70.0 ms; target >= 2x: NOT met)" in bf16
    gpu = target_lines([_row("end_to_end", "triton", "omni7b-20s", "bf16", 0.25, loop_ms=10.0),
                        _row("end_to_end", "release-loop", "omni7b-20s", "bf16", 10.0)], "cuda")
    assert "target <= 0.3 ms: met" in gpu[0] and "40.00x the release-style loop" in gpu[0] and "NOT met" in gpu[0]
    assert "omni7b-120s" in gpu[1] and "not measured in this run" in gpu[1]


def test_quick_run_prints_the_targets(quick_run):
    p, out, _ = quick_run
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("target: ")]
    assert len(lines) == 2 and all("not measured in this run" in ln for ln in lines), lines  # tiny only
    assert json.loads(out.read_text())["meta"]["targets"] == lines
