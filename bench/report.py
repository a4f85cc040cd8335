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
