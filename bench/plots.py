"""PNGs: per-stage bars by provider, and time / peak memory vs clip length (log axes)."""

from __future__ import annotations

import os

from .stages import ALL_OPS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stages(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per (workload, dtype): a subplot per preset, grouped bars (op x provider), log ms."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in rows if r["status"] == "ok" and r["median_ms"] is not None and r["op"] in ALL_OPS]
    written = []
    for wl, dt in sorted({(r["workload"], r["dtype"]) for r in ok}):
        sub = [r for r in ok if r["workload"] == wl and r["dtype"] == dt]
        presets = sorted({r["preset"] for r in sub if r["preset"] != "-"}) or ["-"]
        fig, axes = plt.subplots(1, len(presets), figsize=(7 * len(presets), 4.8), squeeze=False)
        for ax, preset in zip(axes[0], presets):
            rs = [r for r in sub if r["preset"] in (preset, "-")]
            ops = [o for o in ALL_OPS if any(r["op"] == o for r in rs)]
            provs = list(dict.fromkeys(r["provider"] for r in rs))
            width = 0.8 / max(len(provs), 1)
            for j, p in enumerate(provs):
                xs, hs, lo, hi = [], [], [], []
                for i, o in enumerate(ops):
                    m = [r for r in rs if r["op"] == o and r["provider"] == p]
                    if m:
                        r = m[0]
                        xs.append(i + (j - (len(provs) - 1) / 2) * width)
                        hs.append(r["median_ms"])
                        lo.append(r["median_ms"] - r["p20_ms"])
                        hi.append(r["p80_ms"] - r["median_ms"])
                ax.bar(xs, hs, width, yerr=[lo, hi], label=p, capsize=2)
            ax.set_xticks(range(len(ops)))
            ax.set_xticklabels([o.replace("selector-projections ", "proj. ") for o in ops], rotation=30, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("ms (median, p20-p80)")
            ax.set_title(f"{wl} {dt} {preset}")
            ax.grid(axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"stages_{wl}_{dt}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_scaling(points: list[dict], out_dir: str, title: str = "") -> str | None:
    """Time and peak memory vs clip length, log-log."""
    good = [p for p in points if "error" not in p]
    if not good:
        return None
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    xs = [p["seconds"] for p in good]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.3))
    a1.errorbar(xs, [p["median_ms"] for p in good],
                yerr=[[p["median_ms"] - p["p20_ms"] for p in good], [p["p80_ms"] - p["median_ms"] for p in good]],
                marker="o", capsize=3)
    a1.set_ylabel("ms per call (median)")
    a2.plot(xs, [max(p["peak_mem_mb"], 1e-3) for p in good], marker="o", label="peak (one call)")
    a2.plot(xs, [p["input_mb"] for p in good], marker="s", ls="--", label="input embeddings")
    a2.set_ylabel("MB")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clip length (s)")
        ax.grid(which="both", alpha=0.3)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{p['seconds']}s\n{p['frame']}" for p in good], fontsize=7)
        ax.minorticks_off()
    a1.set_title(f"time vs clip length {title}".strip())
    a2.set_title("peak memory vs clip length")
    fig.tight_layout()
    path = os.path.join(out_dir, "scaling.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
