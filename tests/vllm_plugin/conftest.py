"""Fixtures of the vLLM plugin tests (``make test-vllm``, in the ``.venv-vllm`` environment).

Skipped as a whole where vLLM is not installed (the main suite ignores this folder anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import assets  # noqa: E402

ENGINE_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    return assets.build_checkpoint(str(tmp_path_factory.mktemp("omni-tiny")))


@pytest.fixture(scope="session")
def stock_checkpoint(tmp_path_factory) -> str:
    """The same weights without the selector: stock vLLM refuses the unknown thinker.compressor.* keys."""
    return assets.build_checkpoint(str(tmp_path_factory.mktemp("omni-tiny-stock")), with_selector=False)


@pytest.fixture(scope="session")
def reference(checkpoint):
    from reference import Reference

    return Reference(checkpoint)


@pytest.fixture(scope="session")
def run_engine(checkpoint, tmp_path_factory):
    """``run_engine(spec) -> dict``: runs ``engine_run.py`` in a fresh process (results cached per spec)."""
    cache: dict[str, dict] = {}
    work = tmp_path_factory.mktemp("engines")

    def run(spec: dict) -> dict:
        import torch

        spec = dict(spec)
        spec.setdefault("checkpoint", checkpoint)
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        if key in cache:
            return cache[key]
        spec_path, out_path = work / f"{key}.json", work / f"{key}.pt"
        spec_path.write_text(json.dumps(spec))
        env = assets.A.subprocess_env()
        env.pop("TRITON_INTERPRET", None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if not spec.get("plugin", True):
            env["VLLM_PLUGINS"] = "none-but-stock"  # loads no general plugin: vLLM's own model
        proc = subprocess.run([sys.executable, os.path.join(HERE, "engine_run.py"), str(spec_path), str(out_path)],
                              env=env, cwd=str(work), capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
        if proc.returncode != 0:
            lines = (proc.stdout + "\n" + proc.stderr).splitlines()
            errors = [line for line in lines if "Error" in line or "omnisift vLLM plugin" in line][-20:]
            raise AssertionError(f"engine_run failed ({proc.returncode}); error lines:\n" + "\n".join(errors)
                                 + f"\n--- stderr tail:\n{proc.stderr[-4000:]}")
        cache[key] = torch.load(out_path, weights_only=False)
        return cache[key]

    return run
