"""Serving Qwen2.5-Omni in vLLM with and without OmniSIFT: requests/s and time to first token.

``python -m bench.serve`` (in the vLLM environment, ``.venv-vllm`` of ``make test-vllm``) runs one vLLM
engine per setting, each in its own process, on the same requests:

* ``off``: the plugin installed, ``{"omnisift": {"enabled": false}}``: vLLM's own Qwen2.5-Omni thinker;
* ``on``: ``hf_overrides={"omnisift": {"preset": ...}}``: the compressed sequence.

and measures, per engine:

* **TTFT**: wall time of single requests with ``max_tokens=1`` submitted one at a time (processor,
  encoders, compression, prefill, first token; median of ``--ttft-repeats`` distinct requests after
  one warm-up request);
* **throughput**: ``--requests`` distinct requests submitted together with ``max_tokens=--max-tokens``
  (``ignore_eos``): requests/s and generated tokens/s over the wall time of that ``generate`` call.

Prefix caching is off, so every request is prefilled in full. Without ``--model`` a small random
checkpoint is built offline (width ``--hidden-size``, ``--layers`` decoder layers, frames up to
``--frame-size`` pixels a side, with selector weights); the requests are videos of ``--seconds``
seconds at 2 fps with their sound track (``--kind video+audio``) or without (``--kind video``).

Examples::

    python -m bench.serve --json bench/results/serve-cpu/serve.json           # CPU, small random model
    python -m bench.serve --model /ckpt/qwen2.5-omni-7b-omnisift --dtype bfloat16 \\
        --seconds 20 --requests 32 --json bench/results/serve-h100/serve.json   # a GPU, a real checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS_DIR = os.path.join(ROOT, "tests", "vllm_plugin")


def _assets():
    if ASSETS_DIR not in sys.path:
        sys.path.insert(0, ASSETS_DIR)
    import assets

    return assets


def _request(assets, kind: str, seed: int, seconds: int, frame_size: int) -> dict:
    frames = 2 * seconds
    r = assets.request(kind, seed=seed, frames=frames, text="describe what you see and hear.",
                       size=(frame_size, frame_size))
    return assets.vllm_prompt(r)


def worker(spec_path: str, out_path: str) -> None:
    """One engine: warm-up, TTFT, throughput; writes the figures as JSON."""
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams

    assets = _assets()
    kwargs = dict(model=spec["model"], dtype=spec["dtype"], seed=0,
                  enable_prefix_caching=False, limit_mm_per_prompt={"video": 1, "audio": 1},
                  enforce_eager=spec["enforce_eager"])
    if spec["max_model_len"]:
        kwargs["max_model_len"] = spec["max_model_len"]
    if spec["omnisift"] is not None:
        kwargs["hf_overrides"] = {"omnisift": spec["omnisift"]}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    mk = lambda seed: _request(assets, spec["kind"], seed, spec["seconds"], spec["frame_size"])  # noqa: E731
    first = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([mk(10_000)], first, use_tqdm=False)
    ttft, prompt_lens = [], []
    for i in range(spec["ttft_repeats"]):
        t0 = time.perf_counter()
        out = llm.generate([mk(i)], first, use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
        prompt_lens.append(len(out[0].prompt_token_ids))
    many = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    prompts = [mk(1000 + i) for i in range(spec["requests"])]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, many, use_tqdm=False)
    wall = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    with open(out_path, "w") as f:
        json.dump({
            "setting": spec["setting"], "omnisift": spec["omnisift"], "startup_s": startup,
            "ttft_s_median": statistics.median(ttft), "ttft_s": ttft,
            "prompt_tokens_mean": statistics.mean(prompt_lens),
            "throughput_wall_s": wall, "requests_per_s": len(outs) / wall, "generated_tokens_per_s": generated / wall,
            "requests": len(outs), "max_tokens": spec["max_tokens"],
        }, f, indent=1)


def _environment(model: str, device_note: str) -> dict:
    import torch
    import vllm

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(), "commit": commit,
            "model": model, "device": device_note}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Qwen2.5-Omni checkpoint (with thinker.compressor.* weights); default: "
                    "a small random one built here")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--frame-size", type=int, default=224, help="largest frame side in pixels (multiple of 28)")
    ap.add_argument("--seconds", type=int, default=8, help="video length (2 fps)")
    ap.add_argument("--kind", choices=("video+audio", "video"), default="video+audio")
    ap.add_argument("--preset", default="release-default")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ttft-repeats", type=int, default=5)
    ap.add_argument("--dtype", default="auto", help="auto: float32 on the CPU, bfloat16 on a GPU")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    ap.add_argument("--kv-cache-gb", type=int, default=4, help="CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--settings", default="off,on", help="comma-separated among off, on")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0

    import torch

    on_gpu = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    tmp = tempfile.TemporaryDirectory(prefix="omnisift-serve-")
    model = args.model
    if model is None:
        model = _assets().build_checkpoint(os.path.join(tmp.name, "ckpt"), hidden_size=args.hidden_size,
                                           num_layers=args.layers, max_pixels=args.frame_size ** 2)
    results = []
    for setting in args.settings.split(","):
        if setting not in ("off", "on"):
            ap.error(f"--settings: unknown setting {setting!r} (expected off or on)")
        spec = {"setting": setting, "model": model, "dtype": dtype, "max_model_len": args.max_model_len,
                "enforce_eager": not on_gpu, "kind": args.kind, "seconds": args.seconds,
                "frame_size": args.frame_size, "ttft_repeats": args.ttft_repeats, "requests": args.requests,
                "max_tokens": args.max_tokens,
                "omnisift": {"preset": args.preset} if setting == "on" else {"enabled": False}}
        spec_path = os.path.join(tmp.name, f"{setting}.json")
        out_path = os.path.join(tmp.name, f"{setting}.out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        if not on_gpu:
            # vLLM's CPU worker otherwise takes most of the machine's memory for its KV cache.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gb))
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests", "_shims"), ROOT] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.run([sys.executable, "-m", "bench.serve", "--worker", spec_path, out_path], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stdout + "\n" + proc.stderr).splitlines()
            sys.stderr.write("\n".join([ln for ln in lines if "Error" in ln][-30:]) + "\n" + proc.stderr[-3000:])
            print(f"bench.serve: the {setting} engine failed (exit {proc.returncode})")
            return 1
        with open(out_path) as f:
            results.append(json.load(f))
        r = results[-1]
        print(f"{setting:>3}: prompt {r['prompt_tokens_mean']:.0f} tokens | TTFT median {1e3 * r['ttft_s_median']:.0f} ms | "
              f"{r['requests_per_s']:.2f} req/s, {r['generated_tokens_per_s']:.1f} gen tok/s "
              f"({r['requests']} requests x {r['max_tokens']} tokens)", flush=True)
    by = {r["setting"]: r for r in results}
    if "off" in by and "on" in by:
        print(f"compression: TTFT x{by['off']['ttft_s_median'] / by['on']['ttft_s_median']:.2f} faster, "
              f"throughput x{by['on']['requests_per_s'] / by['off']['requests_per_s']:.2f}, prompt "
              f"{by['on']['prompt_tokens_mean'] / by['off']['prompt_tokens_mean']:.0%} of the uncompressed")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        device = torch.cuda.get_device_name() if on_gpu else "cpu"
        with open(args.json, "w") as f:
            json.dump({"command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "environment": _environment(args.model or "random small checkpoint", device),
                       "config": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
