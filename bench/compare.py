"""``python -m bench compare A.json B.json [--threshold 1.1]``: regressions between two runs.

Rows are matched on (workload, dtype, preset, op, provider); only timed rows (status ok) count.
For each pair the ratio ``B.median / A.median`` is printed; a ratio above ``--threshold`` is a
regression (``B`` slower than ``A`` by more than the threshold). Exit status: 0 when no row
regressed, 1 when at least one did, 2 on bad input (unreadable file, nothing to compare).
"""

from __future__ import annotations

import argparse
import sys

from .report import fmt_ms, read_json

KEY = ("workload", "dtype", "preset", "op", "provider")


def _index(rows):
    out = {}
    for r in rows:
        if r.get("status", "ok") == "ok" and r.get("median_ms"):
            out[tuple(str(r.get(k)) for k in KEY)] = r
    return out


def compare(a_rows, b_rows, threshold: float):
    """``(lines, regressions)``: the printed report and the regressed keys."""
    a, b = _index(a_rows), _index(b_rows)
    common = [k for k in a if k in b]
    lines = []
    head = ["workload", "dtype", "preset", "op", "provider", "A ms", "B ms", "B/A", ""]
    table = []
    regressions = []
    for k in common:
        ratio = b[k]["median_ms"] / a[k]["median_ms"]
        flag = "REGRESSION" if ratio > threshold else ("faster" if ratio < 1 / threshold else "")
        if ratio > threshold:
            regressions.append(k)
        table.append([*k, fmt_ms(a[k]["median_ms"]), fmt_ms(b[k]["median_ms"]), f"{ratio:.2f}", flag])
    widths = [max(len(str(r[i])) for r in [head] + table) for i in range(len(head))]
    for r in [head] + table:
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    only_a = [k for k in a if k not in b]
    only_b = [k for k in b if k not in a]
    if only_a:
        lines.append(f"{len(only_a)} row(s) only in A (not compared)")
    if only_b:
        lines.append(f"{len(only_b)} row(s) only in B (not compared)")
    return lines, regressions, len(common)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="baseline JSON (python -m bench --json A.json)")
    ap.add_argument("b", help="new JSON")
    ap.add_argument("--threshold", type=float, default=1.1,
                    help="a row regresses when B/A median exceeds this (default 1.1)")
    args = ap.parse_args(argv)
    if args.threshold <= 0:
        print("compare: --threshold must be positive", file=sys.stderr)
        return 2
    try:
        _, a_rows = read_json(args.a)
        _, b_rows = read_json(args.b)
    except (OSError, ValueError, KeyError) as e:
        print(f"compare: cannot read input: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    lines, regressions, n = compare(a_rows, b_rows, args.threshold)
    print("\n".join(lines))
    if n == 0:
        print("compare: no common timed rows", file=sys.stderr)
        return 2
    if regressions:
        print(f"{len(regressions)} regression(s) of {n} rows (B/A > {args.threshold})")
        return 1
    print(f"no regression in {n} rows (threshold {args.threshold})")
    return 0
