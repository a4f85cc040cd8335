"""Prefill latency of a Qwen2.5-Omni-shaped text model with and without OmniSIFT compression.

``python -m bench.prefill`` builds the thinker's text decoder (``Qwen2_5OmniThinkerTextModel``) at the
real 7B (or 3B) shape with random weights in the chosen dtype, then, per workload and preset, times

* ``full``: one prefill over every token of the merged sequence (``use_cache=True``, as in generate);
* ``compress``: ``omnisift_kernels.compress`` on the same embeddings (backend ``auto``, the processor's
  layout passed as ``grid`` so the call never synchronises), output right-padded;
* ``compressed``: the prefill over the compressed sequence (kept TMRoPE ids, gaps kept);

and prints the speedup ``full / (compress + compressed)`` and the share of the compression in the
full prefill. Nothing is downloaded: the weights are random, which does not change the time.

Examples::

    python -m bench.prefill                                  # omni7b-20s + omni7b-120s, both presets
    python -m bench.prefill --json bench/results/prefill-h200.json
    python -m bench.prefill --workload tiny --shape tiny --device cpu   # a smoke run on the CPU

Prefills are timed with one warm-up and exactly ``--repeat`` timed calls (``time_fn(...,
exact_repeat=True)``: CUDA events on a GPU); the compression with the suite's time budget. The JSON (``--json``) is rewritten after every workload,
and a workload that runs out of memory becomes an error row. Single-row workloads reach SDPA with
``is_causal`` and no mask (flash attention); batches of several rows pass a padding mask, which
rules flash attention out for both the full and the compressed prefill alike.

The text model's vocabulary is shrunk (``--vocab``, default 1024): prefill takes ``inputs_embeds``, so
the embedding table is never read, and the thinker's ``lm_head`` (outside the text model) only sees the
last position during generation.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

import omnisift_kernels
from omnisift_kernels.presets import PRESETS
from omnisift_kernels.synthetic import WORKLOADS, make_workload

from .cases import make_selector
from .env import environment, header_line, pick_device
from .report import write_json
from .timing import time_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Text decoders of the released checkpoints (Qwen2.5-Omni-7B / -3B thinker ``text_config``).
SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, mrope_section=[16, 24, 24], rope_theta=1_000_000.0),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, mrope_section=[16, 24, 24], rope_theta=1_000_000.0),
}


def text_config(shape: str, d_model: int, *, layers: int | None, vocab: int, attn: str):
    """A ``Qwen2_5OmniTextConfig`` of the named shape (``tiny``: the tiny test config of
    :mod:`omnisift_kernels.testing.qwen2_5_omni` at width ``d_model``, 2 layers unless ``layers``)."""
    from transformers import Qwen2_5OmniThinkerConfig

    if shape == "tiny":  # the tiny test config (known to work on every supported version)
        from omnisift_kernels.testing.qwen2_5_omni import tiny_thinker_config

        cfg = tiny_thinker_config(hidden_size=d_model, num_layers=layers or 2, vocab_size=vocab).text_config
    else:
        spec = dict(SHAPES[shape])
        if spec["hidden_size"] != d_model:
            raise ValueError(f"bench.prefill: shape {shape!r} has hidden size {spec['hidden_size']}, but the "
                             f"workload's embeddings have width {d_model}; pick a workload of that width")
        if layers is not None:
            spec["num_hidden_layers"] = layers
        rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta"),
                "mrope_section": spec.pop("mrope_section")}
        cfg = Qwen2_5OmniThinkerConfig(text_config=dict(spec, vocab_size=vocab, max_position_embeddings=131072,
                                                        rope_parameters=rope)).text_config
    cfg._attn_implementation = attn
    return cfg


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_text_model(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The random text decoder, created directly on ``device`` in ``dtype`` (no fp32 copy of 7B)."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerTextModel

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen2_5OmniThinkerTextModel(cfg)
    return model.eval().requires_grad_(False)  # no .to(dtype): the RoPE buffers stay fp32, as when loaded


def _ms(t) -> str:
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                   help="repeatable (default: omni7b-20s and omni7b-120s)")
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="repeatable (default: paper-35 and paper-25)")
    p.add_argument("--shape", choices=[*SHAPES, "tiny"], default=None,
                   help="text model shape (default: 7b for width 3584, 3b for 2048, tiny otherwise)")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the random model (unused by prefill)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed prefills per row, after one warm-up (default 5 on CUDA, 3 on the CPU); the "
                        "compression is timed from a time budget")
    p.add_argument("--json", metavar="PATH", help="write the rows and the environment as JSON")
    return p.parse_args(argv)


def _default_shape(d_model: int) -> str:
    return {3584: "7b", 2048: "3b"}.get(d_model, "tiny")


def run(args) -> list[dict]:
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    workloads = args.workload or ["omni7b-20s", "omni7b-120s"]
    presets = args.preset or ["paper-35", "paper-25"]
    repeat = args.repeat or (5 if device.type == "cuda" else 3)
    env = environment(device)
    print(header_line(env), flush=True)
    rows: list[dict] = []
    built: tuple | None = None
    model = None
    print("workload      | preset   | tokens          | full prefill ms | compress ms | compressed prefill ms "
          "| speedup | compress / full")
    for wl in workloads:
        d_model = WORKLOADS[wl].d_model
        shape = args.shape or _default_shape(d_model)
        try:
            if built != (shape, d_model):
                model = None  # one model on the device at a time: drop the old one before building
                built = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                t0 = time.perf_counter()
                cfg = text_config(shape, d_model, layers=args.layers, vocab=args.vocab, attn=args.attn)
                model = build_text_model(cfg, device, dtype)
                built = (shape, d_model)
                print(f"[prefill] {shape} text model: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
                      f"{dtype}, {args.attn}; built in {time.perf_counter() - t0:.1f} s", flush=True)
            rows.extend(_run_workload(args, wl, model, device, dtype, presets, repeat, env))
        except torch.OutOfMemoryError as e:
            print(f"{wl:13s} | out of memory: {str(e).splitlines()[0]}", flush=True)
            rows.append(dict(workload=wl, error=f"out of memory: {str(e).splitlines()[0]}",
                             **{k: env[k] for k in ("device_name", "commit")}))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.json:  # after every workload, so that a later failure keeps the rows measured so far
            write_json(args.json, env, rows)
    if args.json:
        print(f"wrote {args.json} ({len(rows)} rows)")
    return rows


def _run_workload(args, wl: str, model, device, dtype, presets, repeat: int, env: dict) -> list[dict]:
    """The rows of one workload: the full prefill once, then the compression and the compressed
    prefill per preset."""
    d_model = WORKLOADS[wl].d_model
    batch = make_workload(wl, dtype=dtype, device=device, seed=0)
    selector = make_selector(d_model, device=device)
    kw = dict(batch.compress_kwargs(), labels=None)  # inference: no labels to gather
    mask = kw["attention_mask"]
    if args.attn == "eager" and batch.inputs_embeds.shape[1] > 8192:
        print(f"[prefill] warning: --attn eager materialises [B, heads, L, L] scores; L = "
              f"{batch.inputs_embeds.shape[1]} may not fit", file=sys.stderr, flush=True)

    def full(_i):
        return model(inputs_embeds=kw["inputs_embeds"], position_ids=kw["position_ids"],
                     attention_mask=mask, use_cache=True)

    rows = []
    with torch.no_grad():
        t_full = time_fn(full, 1, device, repeat=repeat, exact_repeat=True)
        for preset in presets:
            p = PRESETS[preset]

            def compress(_i):
                return omnisift_kernels.compress(
                    **kw, rho_video=p.rho_video, rho_audio=p.rho_audio, selector=selector,
                    output="right", grid=batch.rows)

            out = compress(0)

            def compressed(_i):
                return model(inputs_embeds=out.inputs_embeds, position_ids=out.position_ids,
                             attention_mask=out.attention_mask, use_cache=True)

            t_c = time_fn(compress, 1, device, budget_s=1.0, min_repeat=5, max_repeat=100)
            t_p = time_fn(compressed, 1, device, repeat=repeat, exact_repeat=True)
            total_before = int(mask.sum())
            total_after = int(out.attention_mask.sum())
            speedup = t_full.median_ms / (t_c.median_ms + t_p.median_ms)
            share = t_c.median_ms / t_full.median_ms
            row = dict(workload=wl, preset=preset, shape=args.shape or _default_shape(d_model),
                       layers=model.config.num_hidden_layers, dtype=str(dtype).replace("torch.", ""),
                       attn=args.attn, tokens_full=total_before, tokens_compressed=total_after)
            for name, t in (("full_prefill", t_full), ("compress", t_c), ("compressed_prefill", t_p)):
                row.update({f"{name}_ms": t.median_ms, f"{name}_p20_ms": t.p20_ms, f"{name}_p80_ms": t.p80_ms,
                            f"{name}_n": t.n})
            row.update(speedup=speedup, compress_share=share, **{k: env[k] for k in ("device_name", "commit")})
            rows.append(row)
            print(f"{wl:13s} | {preset:8s} | {total_before:6d} -> {total_after:6d} | "
                  f"{_ms(t_full.median_ms):>15s} | {_ms(t_c.median_ms):>11s} | {_ms(t_p.median_ms):>21s} "
                  f"| {speedup:6.2f}x | {100 * share:.2f}%", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from omnisift_kernels.integrations.qwen2_5_omni import check_transformers_version

        check_transformers_version()
    except (ImportError, RuntimeError) as e:
        print(f"bench.prefill: needs transformers: {e}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
