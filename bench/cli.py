"""``python -m bench``: the benchmark suite (see ``bench/__init__.py`` for the full usage)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from omnisift_kernels.synthetic import DEFAULT_WORKLOAD, WORKLOADS

from . import cases as C
from . import env as E
from . import providers as P
from . import stages as S
from .report import format_table, target_lines, write_json
from .timing import time_fn, time_interleaved

OP_ALIASES = {"floor": S.FLOOR, "e2e": S.END_TO_END, "end-to-end": S.END_TO_END}
N_INPUTS = 2  # input sets (seeds) rotated by the timer


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="OmniSIFT benchmark suite. Subcommand: python -m bench compare A.json B.json [--threshold 1.1]",
    )
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                    help=f"workload (repeatable; default {DEFAULT_WORKLOAD}, tiny with --quick)")
    ap.add_argument("--op", action="append",
                    help=f"stage filter (repeatable): {', '.join(S.ALL_OPS)} (aliases: floor, e2e)")
    ap.add_argument("--provider", action="append", choices=list(P.PROVIDERS),
                    help="provider (repeatable; default: every available one, compile-reference only when named)")
    ap.add_argument("--dtype", action="append", choices=list(C.DTYPES),
                    help="embedding dtype (repeatable; default fp32+bf16 on CPU, bf16 on CUDA)")
    ap.add_argument("--preset", action="append", choices=["paper-35", "paper-25", "release-default"],
                    help="ratio preset (repeatable; default paper-35 and paper-25)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed calls per row (default: chosen from a time budget, at least 5)")
    ap.add_argument("--json", metavar="PATH", help="write every row (and the scaling points) as JSON")
    ap.add_argument("--plot", metavar="DIR", help="write PNGs (per-stage bars; scaling) into DIR (runs --scaling)")
    ap.add_argument("--scaling", action="store_true", help="time and peak memory vs clip length, 10 s to 600 s")
    ap.add_argument("--quick", action="store_true", help="seconds: tiny workload, small repeats (CI)")
    ap.add_argument("--seed", type=int, default=0, help="first input seed (the timer rotates seed, seed+1)")
    ap.add_argument("--selector-dtype", choices=["same", "fp32"], default="same",
                    help="selector parameters in the embeddings' dtype (default, as in a bf16 model; a "
                         "bf16 selector rounds differently per implementation, so audio tokens tied "
                         "within its score tolerance may differ from the reference: checked, and "
                         "reported in the row) or in fp32 (every provider then agrees exactly)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's choice)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _ops(args) -> list[str]:
    if not args.op:
        return list(S.ALL_OPS)
    out = []
    for o in args.op:
        o = OP_ALIASES.get(o, o)
        if o not in S.ALL_OPS:
            raise SystemExit(f"bench: unknown --op {o!r}; expected one of {', '.join(S.ALL_OPS)} (or floor, e2e)")
        out.append(o)
    return out


class Runner:
    def __init__(self, args, device: torch.device, env: dict) -> None:
        self.args = args
        self.device = device
        self.env = env
        self.quick = args.quick
        self.budget = 0.01 if args.quick else 0.25
        self.min_repeat = 3 if args.quick else 5
        # End-to-end rows (interleaved): a larger budget per group of providers, at least 15 rounds
        # (the release-style loop's calls spread by +-15% within a run on a shared VM; with 9 rounds
        # the median of a row moved by several percent between runs).
        self.e2e_budget = 0.02 if args.quick else 5.0
        self.e2e_min_repeat = 3 if args.quick else 15
        self.max_repeat = 10 if args.quick else 200
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.factory = C.CaseFactory()

    # ---------------------------------------------------------------------------------- rows
    def row(self, op, provider, workload, dtype, preset, status="ok", reason=None, timing=None, **extra) -> dict:
        r = {"op": op, "provider": provider, "workload": workload, "dtype": dtype, "preset": preset,
             "status": status, "reason": reason, "median_ms": None, "p20_ms": None, "p80_ms": None, "n": None,
             "gbps": None, "copy_fraction": None, "speedup_vs_release": None, "gflops": None,
             "kept_tokens": None, "total_tokens": None, "retention_pct": None}
        if timing is not None:
            r.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, n=timing.n)
        r.update(extra)
        if workload != "all" and getattr(self, "selector_dtype", None):
            r.setdefault("selector_dtype", self.selector_dtype)
        r.update(self.env)
        self.rows.append(r)
        return r

    def time(self, fn, n):
        return time_fn(fn, n, self.device, repeat=self.args.repeat, budget_s=self.budget,
                       min_repeat=self.min_repeat, max_repeat=self.max_repeat)

    def add_traffic(self, r, op, info):
        nbytes, flops = S.traffic(op, info)
        if nbytes is not None and r["median_ms"]:
            r["gbps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
            r["bytes"] = nbytes
            if op in S.MEMORY_BOUND and self.copy_bw:
                r["copy_fraction"] = r["gbps"] / self.copy_bw
        if flops is not None and r["median_ms"]:
            r["gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9
            if op in (S.FLOOR, "selector"):
                r["note"] = f"{r['gflops']:.0f} GFLOP/s"

    # --------------------------------------------------------------------------------- run
    def run(self, workloads, dtypes, presets, ops, selected, explicit, progress) -> None:
        avail = P.availability(self.device)
        active = []
        for name in selected:
            p = P.PROVIDERS[name]
            if avail[name] is not None:
                self.row(S.END_TO_END, name, "all", "all", "all", "unavailable", avail[name])
            elif p.explicit_only and name not in explicit:
                self.row(S.END_TO_END, name, "all", "all", "all", "skipped", P.SKIPPED_SLOW[len("skipped "):].strip("()"))
            else:
                active.append(name)
        self.active = active
        seeds = [self.args.seed + i for i in range(N_INPUTS)]
        for wl in workloads:
            for dt in dtypes:
                for preset in presets:
                    cases = self.factory.cases(wl, dt, preset, self.device, seeds, self.args.selector_dtype)
                    self.run_group(wl, dt, preset, cases, ops, progress)
                    if S.FLOOR in ops:
                        self.run_floor(wl, dt, preset, cases, progress)
            self.factory.drop(wl)

    def run_floor(self, wl, dt, preset, cases, progress):
        # The projections over the tokens the selector really sees: surviving video and all audio.
        fns = [S.floor_callable(c, self.ref_masks[id(c)]) for c in cases]
        t = self.time(lambda i: fns[i](), len(fns))
        r = self.row(S.FLOOR, "torch F.linear x2", wl, dt, preset, timing=t)
        self.add_traffic(r, S.FLOOR, self.info)
        if self.device.type == "cpu":
            # The same two projections with the GEMM the fast path picks on this CPU (cpu_gemm).
            from omnisift_kernels.cpu_gemm import gemm_policy

            pol = gemm_policy()
            lib_fns = [S.floor_callable(c, self.ref_masks[id(c)], library=True) for c in cases]
            t = self.time(lambda i: lib_fns[i](), len(lib_fns))
            r = self.row(S.FLOOR, f"cpu_gemm x2 ({pol['fp32']}, half {pol['half']})", wl, dt, preset, timing=t)
            self.add_traffic(r, S.FLOOR, self.info)
        progress.update(1)

    def run_group(self, wl, dt, preset, cases, ops, progress):
        # The oracle: reference keep masks and the counts every row reports.
        from omnisift_kernels import compress

        refs = [compress(**c.kwargs(), backend="reference") for c in cases]
        ref_masks = {id(c): r.keep_mask for c, r in zip(cases, refs)}
        self.ref_masks = ref_masks
        ref0, b0 = refs[0], cases[0].batch
        cnt = C.counts(b0)
        sel = cases[0].selector
        self.selector_dtype = C.DTYPE_NAMES.get(sel.param_dtype, str(sel.param_dtype))
        kept_av = int((ref0.video_kept + ref0.audio_kept).sum())
        total_av = int((ref0.video_total + ref0.audio_total).sum())
        retention = 100.0 * kept_av / total_av if total_av else 100.0
        scored = ref0.audio_scores is not None and ref0.audio_scores.gt(0)
        self.info = info = dict(
            B=b0.inputs_embeds.shape[0], L=b0.inputs_embeds.shape[1], D=cnt["d_model"], valid=cnt["valid"],
            video=cnt["video"], audio=cnt["audio"], kept=int(ref0.indices.numel()),
            video_kept=int(ref0.video_kept.sum()), audio_kept=int(ref0.audio_kept.sum()),
            elem=b0.inputs_embeds.element_size(), sel_elem=sel.v_proj.weight.element_size(),
            H=sel.hidden_dim, sel_params=sum(p.numel() for p in sel.parameters()),
            scored_audio=int(scored.sum()) if scored is not False else 0,
            surviving_video=int(ref0.video_kept.sum()),
        )
        kept_fields = dict(kept_tokens=kept_av, total_tokens=total_av, retention_pct=retention)
        exp = C.EXPECTED_RETENTION.get((wl, preset))
        if exp is not None:
            got = f"{retention:.2f}%"
            self.acceptance.append((wl, preset, dt, got, exp))
            if got != exp:
                self.failures.append(f"retention of {wl} {preset} {dt} is {got}, expected {exp}")

        e2e_jobs = {}
        for name in self.active:
            p = P.PROVIDERS[name]
            # 1. Agreement with the reference, before any timing.
            e2e_fns = None
            if p.e2e is not None and S.END_TO_END in ops:
                ties = None
                try:
                    e2e_fns = [p.e2e(c) for c in cases]
                    ties = [self.mask_ties(c, f(), r) for f, c, r in zip(e2e_fns, cases, refs)]
                except AssertionError as e:
                    self._fail(name, wl, dt, preset, S.END_TO_END, "mismatch", f"{P._exc(e)}; not timed")
                    e2e_fns = None
                    progress.update(1)
                except Exception as e:
                    self._fail(name, wl, dt, preset, S.END_TO_END, "error", P._exc(e))
                    e2e_fns = None
                    progress.update(1)
            stage_dicts = None
            want_stages = [o for o in S.STAGES if o in ops]
            factory = P.SINGLE_STAGE[name](ref_masks) if name in P.SINGLE_STAGE else p.stage_factory(self.device)
            if want_stages and factory is not None:
                try:
                    stage_dicts = [factory(c) for c in cases]
                    for d, c, r in zip(stage_dicts, cases, refs):
                        mask = d["_keep_mask"]() if "_keep_mask" in d else None
                        n_ties = self.mask_ties(c, mask, r) if mask is not None else 0
                        if "_packed" in d:
                            # Near ties change which rows are kept: then the packed output must be the
                            # provider's own kept rows, in order.
                            x = c.kwargs()["inputs_embeds"]
                            want = r.inputs_embeds if not n_ties else x.reshape(-1, x.shape[-1])[mask.flatten()]
                            if not torch.equal(d["_packed"](), want):
                                raise AssertionError("packed output differs from the kept rows")
                except AssertionError as e:
                    self._fail(name, wl, dt, preset, "stages", "mismatch", P._exc(e))
                    stage_dicts = None
                except Exception as e:  # a stage hook out of step with its pipeline: report, not fail
                    self.row("stages", name, wl, dt, preset, "unavailable", f"stage hook failed: {P._exc(e)}")
                    stage_dicts = None
            # 2. Timing.
            for op in want_stages:
                if stage_dicts is None or op not in stage_dicts[0]:
                    continue
                fns = [d[op] for d in stage_dicts]
                r = self.row(op, name, wl, dt, preset, timing=self.time(lambda i: fns[i](), len(fns)))
                self.add_traffic(r, op, info)
                progress.update(1)
            if e2e_fns is not None:
                e2e_jobs[name] = (e2e_fns, ties)
        # 3. End to end: every provider timed round-robin (see timing.time_interleaved), so that the
        # ratios to the release-style loop compare calls made under the same conditions.
        if e2e_jobs:
            n_in = len(cases)
            timings = time_interleaved(
                {name: (lambda fns: (lambda i: fns[i]()))(fns) for name, (fns, _) in e2e_jobs.items()},
                n_in, self.device, repeat=self.args.repeat, budget_s=self.e2e_budget,
                min_repeat=self.e2e_min_repeat, max_repeat=self.max_repeat)
            for name, (fns, ties) in e2e_jobs.items():
                r = self.row(S.END_TO_END, name, wl, dt, preset, timing=timings[name], **kept_fields)
                r["timing"] = "interleaved"
                self.add_traffic(r, S.END_TO_END, info)
                if any(ties):
                    r["near_tie_tokens"] = max(ties)
                    r["note"] = f"{max(ties)} near-tied token(s) differ from the reference"
                progress.update(1)

    def mask_ties(self, case, mask, ref) -> int:
        """Checks a provider's keep mask against the reference's; returns the near-tie differences.

        Equal masks pass. Otherwise every difference must be a near tie
        (:func:`omnisift_kernels.testing.near_tie_differences`): video tokens within the similarity
        tolerance of their frame's cut (the release-style loop computes its cosines in fp32, the
        reference in fp64), audio tokens within the selector dtype's score tolerance of their chunk's
        cut (a bf16 selector rounds differently per implementation). Raises AssertionError on
        anything else.
        """
        from omnisift_kernels.testing import near_tie_differences

        if torch.equal(mask, ref.keep_mask):
            return 0
        kw = case.kwargs()
        return near_tie_differences(
            mask, ref.keep_mask, ref.audio_scores, kw["inputs_embeds"], kw["input_ids"], kw["position_ids"],
            kw["attention_mask"], video_token_id=kw["video_token_id"], audio_token_id=kw["audio_token_id"],
            selector_dtype=case.selector.param_dtype)

    def _fail(self, name, wl, dt, preset, op, status, reason):
        self.row(op, name, wl, dt, preset, status, reason)
        self.failures.append(f"{name} {wl} {dt} {preset} {op}: {status}: {reason}")

    def finish(self) -> None:
        """Speedups vs the release-style loop, and the table order."""
        base = {(r["workload"], r["dtype"], r["preset"], r["op"]): r["median_ms"]
                for r in self.rows if r["provider"] == P.BASELINE and r["status"] == "ok"}
        for r in self.rows:
            b = base.get((r["workload"], r["dtype"], r["preset"], r["op"]))
            if r["status"] == "ok" and b and r["median_ms"]:
                r["speedup_vs_release"] = b / r["median_ms"]
        order = {o: i for i, o in enumerate(S.ALL_OPS)}
        prov = {p: i for i, p in enumerate(P.PROVIDERS)}
        timed = [r for r in self.rows if r["workload"] != "all"]
        status = [r for r in self.rows if r["workload"] == "all"]
        grp = {}
        for r in timed:
            grp.setdefault((r["workload"], r["dtype"]), len(grp))
        pres = {"paper-35": 0, "paper-25": 1, "release-default": 2, "-": 9}
        timed.sort(key=lambda r: (grp[(r["workload"], r["dtype"])], pres.get(r["preset"], 5),
                                  order.get(r["op"], 99), prov.get(r["provider"], 99)))
        self.rows = timed + status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from .compare import main as compare_main

        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*compiled extension.*")
    t_start = time.perf_counter()
    device = E.pick_device(args.device)
    env = E.environment(device)
    print(E.header_line(env), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    workloads = args.workload or (["tiny"] if args.quick else [DEFAULT_WORKLOAD])
    # --quick: one dtype and one preset unless asked for (seconds, for CI).
    dtypes = args.dtype or (C.default_dtypes(device)[:1] if args.quick else C.default_dtypes(device))
    presets = args.preset or (["paper-35"] if args.quick else list(C.DEFAULT_PRESETS))
    ops = _ops(args)
    selected = args.provider or list(P.PROVIDERS)
    explicit = set(args.provider or [])
    torch.set_grad_enabled(False)

    from .timing import copy_bandwidth

    runner = Runner(args, device, env)
    runner.acceptance = []
    copy_gbps, copy_t = copy_bandwidth(device, quick=args.quick)
    runner.copy_bw = copy_gbps
    avail = P.availability(device)
    n_active = sum(1 for n in selected if avail[n] is None and not (P.PROVIDERS[n].explicit_only and n not in explicit))
    per_provider = len([o for o in S.STAGES if o in ops]) + (S.END_TO_END in ops)
    total = len(workloads) * len(dtypes) * len(presets) * (n_active * per_provider + (S.FLOOR in ops))
    do_scaling = args.scaling or bool(args.plot)
    from tqdm import tqdm

    from .scaling import FULL_POINTS, QUICK_POINTS

    n_scaling = len(QUICK_POINTS if args.quick else FULL_POINTS) if do_scaling else 0
    progress = tqdm(total=total + n_scaling, file=sys.stderr, disable=args.no_progress, desc="bench",
                    unit="row", dynamic_ncols=True, leave=False)
    with progress:
        runner.run(workloads, dtypes, presets, ops, selected, explicit, progress)
        runner.finish()
        t_main = time.perf_counter() - t_start
        scaling = []
        progress.total = progress.n + n_scaling  # the stage count of a pipeline hook is known only now
        progress.refresh()
        if do_scaling:
            scaling = run_scaling_section(runner, args, device, dtypes, presets, progress)
    t_total = time.perf_counter() - t_start

    print(f"copy bandwidth (dst.copy_(src), best of {copy_t.n} calls): {copy_gbps:.1f} GB/s "
          f"(median call {copy_t.median_ms:.2f} ms) | GB/s = minimal traffic / median; "
          f"% copy BW for memory-bound ops ({', '.join(sorted(S.MEMORY_BOUND))})")
    print(format_table(runner.rows))
    for wl, preset, dt, got, exp in runner.acceptance:
        print(f"acceptance: retention {wl} {preset} {dt}: {got} (expected {exp}) {'OK' if got == exp else 'FAIL'}")
    targets = target_lines(runner.rows, device.type)
    for line in targets:
        print(line)
    if scaling:
        from .scaling import format_scaling

        ok = [p for p in scaling if "error" not in p]
        what = ok[0] if ok else {}
        print(f"\nscaling: provider {what.get('provider')} {what.get('dtype')} {what.get('preset')}, "
              f"peak memory: {what.get('mem_method')}")
        print(format_scaling(scaling))
    meta = dict(env, copy_bw_gbps=copy_gbps, header=E.header_line(env), argv=argv, wall_s=t_total,
                main_wall_s=t_main, scaling=scaling, failures=runner.failures, targets=targets)
    rows = list(runner.rows)
    for p in scaling:
        if "error" in p:
            continue
        rows.append(dict(env, op="scaling end_to_end", provider=p["provider"],
                         workload=f"clip-{p['seconds']}s-{p['frame']}-D{p['d_model']}", dtype=p["dtype"],
                         preset=p["preset"], status="ok", reason=None, median_ms=p["median_ms"], p20_ms=p["p20_ms"],
                         p80_ms=p["p80_ms"], n=p["n"], gbps=None, peak_mem_mb=p["peak_mem_mb"],
                         tokens=p["tokens"]))
    if args.json:
        write_json(args.json, meta, rows)
        print(f"wrote {args.json} ({len(rows)} rows)")
    if args.plot:
        from .plots import plot_scaling, plot_stages

        paths = plot_stages(runner.rows, args.plot)
        sp = plot_scaling(scaling, args.plot, title=f"({scaling[0].get('provider', '')})" if scaling else "")
        paths += [sp] if sp else []
        print("wrote " + ", ".join(paths))
    print(f"done in {t_total:.1f} s (main table {t_main:.1f} s, scaling {t_total - t_main:.1f} s)", file=sys.stderr)
    if runner.failures:
        print("FAILED checks:\n  " + "\n  ".join(runner.failures), file=sys.stderr)
        return 1
    return 0


def run_scaling_section(runner, args, device, dtypes, presets, progress) -> list[dict]:
    """Scaling for the fastest available provider: the fast path (triton on CUDA, else cpu) when it
    ran and agreed with the reference in this run, else the reference. Chosen by rank, not by this
    run's medians, which a loaded machine makes too noisy to pick from."""
    from .scaling import run_scaling

    agreed = {r["provider"] for r in runner.rows if r["op"] == S.END_TO_END and r["status"] == "ok"}
    provider = next((n for n in ("triton", "cpu", "reference", "release-loop") if n in agreed), "reference")
    preset = "paper-35" if "paper-35" in presets else presets[0]
    return run_scaling(provider=provider, dtype=dtypes[0], preset=preset, device=device, quick=args.quick,
                       repeat=args.repeat, progress=progress)
