"""Runs one vLLM engine on a list of requests and saves what the tests compare (a program, not a test).

Each engine runs in its own process (``python tests/vllm_plugin/engine_run.py SPEC.json OUT.pt``), so engines
with different settings never share a process. ``SPEC`` holds:

- ``checkpoint``: the model directory;
- ``plugin``: False hides this package's vLLM plugin from vLLM (``VLLM_PLUGINS`` is set by the caller);
- ``omnisift``: the ``hf_overrides["omnisift"]`` section, or None;
- ``engine``: extra ``LLM(...)`` arguments (``max_num_batched_tokens``, ``enable_prefix_caching``, ...);
- ``rounds``: lists of requests (``assets.request`` arguments) submitted one ``generate`` call per round,
  so a later round can hit the prefix cache of an earlier one;
- ``prompt_logprobs``: whether to ask for them (vLLM does not read the prefix cache for such requests);
- ``error_requests``: requests expected to fail; their error messages are saved (``errors``).

The output is a list per round of per-request dicts: ``prompt_ids``, ``prompt_logprobs`` (per position a
``{token: logprob}`` or None), ``gen_ids``, ``gen_logprobs`` (per step ``{token: logprob}``) and
``num_cached_tokens``; plus the engine's effective ``max_num_batched_tokens`` and the model class name.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import assets  # noqa: E402


def _logprobs(entry):
    if entry is None:
        return None
    return {int(k): float(v.logprob) for k, v in entry.items()}


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["checkpoint"], dtype="float32", max_model_len=4096, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"video": 2, "audio": 2, "image": 2})
    kwargs.update(spec.get("engine", {}))
    if spec.get("omnisift") is not None:
        kwargs["hf_overrides"] = {"omnisift": spec["omnisift"]}
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=spec.get("max_tokens", 3), temperature=0.0, logprobs=5,
                            prompt_logprobs=0 if spec.get("prompt_logprobs", True) else None)
    rounds = []
    for requests in spec["rounds"]:
        prompts = [assets.vllm_prompt(assets.request(**r)) for r in requests]
        outs = llm.generate(prompts, params, use_tqdm=False)
        rounds.append([{
            "prompt_ids": list(o.prompt_token_ids),
            "prompt_logprobs": [_logprobs(p) for p in o.prompt_logprobs] if o.prompt_logprobs else None,
            "gen_ids": list(o.outputs[0].token_ids),
            "gen_logprobs": [_logprobs(p) for p in o.outputs[0].logprobs],
            "num_cached_tokens": int(o.num_cached_tokens or 0),
        } for o in outs])
    errors = []
    for r in spec.get("error_requests", []):
        try:
            llm.generate([assets.vllm_prompt(assets.request(**r))], params, use_tqdm=False)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - the test reads the message
            errors.append(f"{type(e).__name__}: {e}")
    cfg = llm.llm_engine.vllm_config
    torch.save({"rounds": rounds, "errors": errors, "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
                "architecture": cfg.model_config.architectures}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
