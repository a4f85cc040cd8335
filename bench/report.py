"""The one table, the JSON file and a few formatting helpers."""

from __future__ import annotations

import json
import math
import os


def _f(v, fmt="{:.3g}", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return fmt.format(v)


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


COLUMNS = ["workload", "dtype", "preset", "stage", "provider", "median ms", "p20-p80 ms", "GB/s",
           "% copy BW", "x release", "kept (retention)"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            cells = [r["workload"], r["dtype"], r["preset"], r["op"], r["provider"],
                     f"{r['status']}: {r['reason']}" if r.get("reason") else r["status"]]
            out.append(cells)
            continue
        kept = "-"
        if r.get("kept_tokens") is not None:
            kept = f"{r['kept_tokens']}/{r['total_tokens']} ({r['retention_pct']:.2f}%)"
        note = r.get("note")
        cells = [
            r["workload"], r["dtype"], r["preset"], r["op"], r["provider"],
            fmt_ms(r["median_ms"]), f"{fmt_ms(r['p20_ms'])}-{fmt_ms(r['p80_ms'])}",
            _f(r.get("gbps"), "{:.1f}"),
            _f(None if r.get("copy_fraction") is None else 100 * r["copy_fraction"], "{:.1f}%"),
            _f(r.get("speedup_vs_release"), "{:.2f}x"),
            kept + (f"  [{note}]" if note else ""),
        ]
        out.append(cells)
    return out


def format_table(rows: list[dict]) -> str:
    body = table_rows(rows)
    ncol = len(COLUMNS)
    widths = [len(c) for c in COLUMNS]
    for cells in body:
        if len(cells) == ncol:
            for i, c in enumerate(cells):
                widths[i] = max(widths[i], len(c))
        else:  # status rows: the first five columns align, the message spans the rest
            for i, c in enumerate(cells[:5]):
                widths[i] = max(widths[i], len(c))
    right = {5, 6, 7, 8, 9}

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            if len(cells) != ncol and i == len(cells) - 1:
                parts.append(c)
            else:
                parts.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return " | ".join(parts).rstrip()

    sep = "-+-".join("-" * w for w in widths)
    lines = [line(COLUMNS), sep]
    prev = None
    for r, cells in zip(rows, body):
        group = (r["workload"], r["dtype"], r["preset"] if r["preset"] != "-" else prev and prev[2])
        if prev is not None and group != prev:
            lines.append(sep)
        prev = group
        lines.append(line(cells))
    return "\n".join(lines)


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"schema": 1, "meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")


def read_json(path: str) -> tuple[dict, list[dict]]:
    """Reads a ``--json`` file (an object with ``rows``, or a bare list of rows)."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return {}, data
    return data.get("meta", {}), data["rows"]


# The performance targets of the pipeline issue (issue 6), checked against a run's rows:
# (workload, preset, dtype, device type, provider, max ms or None, min speedup vs the loop or None).
TARGETS = (
    ("omni7b-20s", "paper-35", "fp32", "cpu", "cpu", None, 2.0),
    ("omni7b-20s", "paper-35", "bf16", "cpu", "cpu", None, 2.0),
    ("omni7b-20s", "paper-35", "bf16", "cuda", "triton", 0.3, 50.0),
    ("omni7b-120s", "paper-35", "bf16", "cuda", "triton", 1.0, None),
)


def _e2e(rows: list[dict], workload: str, preset: str, dtype: str, provider: str) -> dict | None:
    for r in rows:
        if (r["op"] == "end_to_end" and r["status"] == "ok" and r["provider"] == provider
                and r["workload"] == workload and r["preset"] == preset and r["dtype"] == dtype):
            return r
    return None


def _floor(rows: list[dict], workload: str, preset: str, dtype: str) -> dict | None:
    """The floor row of the library's own GEMM choice (``cpu_gemm x2 ...``), else any floor row."""
    found = [r for r in rows if r["op"] == "selector-projections floor" and r["status"] == "ok"
             and r["workload"] == workload and r["preset"] == preset and r["dtype"] == dtype]
    found.sort(key=lambda r: not r["provider"].startswith("cpu_gemm"))
    return found[0] if found else None


def target_lines(rows: list[dict], device_type: str) -> list[str]:
    """One line per performance target of this device type: measured figure, target, met or not.

    The figures are the run's end-to-end medians (interleaved rounds: the ratio compares calls made
    under the same conditions). A target whose rows are not in the run says so (and how to get them).
    Informational: a missed speed target does not change the exit status (timings vary between runs
    on a shared machine; the retention acceptance does).
    """
    out = []
    for wl, preset, dt, dev, provider, max_ms, min_x in TARGETS:
        if dev != device_type:
            continue
        name = f"target: {wl} {preset} {dt} ({provider})"
        r = _e2e(rows, wl, preset, dt, provider)
        if r is None:
            out.append(f"{name}: not measured in this run (python -m bench --workload {wl} --dtype {dt} "
                       f"--preset {preset})")
            continue
        parts = [f"{fmt_ms(r['median_ms'])} ms"]
        if max_ms is not None:
            parts.append(f"target <= {max_ms:g} ms: {'met' if r['median_ms'] <= max_ms else 'NOT met'}")
        loop = _e2e(rows, wl, preset, dt, "release-loop")
        if min_x is not None:
            x = r.get("speedup_vs_release")  # the table's "x release" column (cli.Runner.finish)
            if loop is None or x is None:
                parts.append(f"target >= {min_x:g}x the release-style loop: loop not measured")
            else:
                parts.append(f"{x:.2f}x the release-style loop ({fmt_ms(loop['median_ms'])} ms; target >= "
                             f"{min_x:g}x: {'met' if x >= min_x else 'NOT met'})")
        ref = _e2e(rows, wl, preset, dt, "reference")
        if ref is not None and dev == "cpu":
            x = ref["median_ms"] / r["median_ms"]
            parts.append(f"{x:.2f}x the reference ({fmt_ms(ref['median_ms'])} ms; target > 1x: "
                         f"{'met' if x > 1 else 'NOT met'})")
        floor = _floor(rows, wl, preset, dt)
        if floor is not None and dev == "cpu":
            parts.append(f"projections floor {fmt_ms(floor['median_ms'])} ms ({provider} path = "
                         f"{r['median_ms'] / floor['median_ms']:.2f}x the floor)")
        out.append(f"{name}: " + "; ".join(parts))
    return out
