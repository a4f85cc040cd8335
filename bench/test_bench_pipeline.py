"""pytest-benchmark: end-to-end OmniSIFT per provider, sharing workloads and providers with the CLI.

* ``make test`` (``--benchmark-disable``): every available provider once on the ``tiny`` workload,
  checked against the reference keep mask (fast: seconds).
* Bigger workloads only when asked: ``OMNISIFT_BENCH_WORKLOADS=omni7b-20s,omni3b-20s`` or when
  pytest runs with ``--benchmark-only``, e.g.::

      pytest bench/test_bench_pipeline.py --benchmark-only
      OMNISIFT_BENCH_WORKLOADS=omni7b-20s pytest bench/test_bench_pipeline.py --benchmark-only
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.cases import CaseFactory
from bench.providers import PROVIDERS, availability
from bench.release_loop import release_loop_compress
from omnisift_kernels import VisionGuidedAudioSelector, compress

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = "bf16" if DEVICE.type == "cuda" else "fp32"
_AVAIL = availability(DEVICE)
_FACTORY = CaseFactory()
E2E_PROVIDERS = [n for n, p in PROVIDERS.items() if p.e2e is not None and not p.explicit_only]


def _workloads(config) -> list[str]:
    env = os.environ.get("OMNISIFT_BENCH_WORKLOADS")
    if env:
        return [w.strip() for w in env.split(",") if w.strip()]
    if config.getoption("benchmark_only", default=False):
        return ["tiny", "omni7b-20s"]
    return ["tiny"]


def golden_path() -> Path | None:
    """``shared/golden/release_masks.pt``: ``shared/`` is the sibling of the repository root (as in
    ``tests/test_golden.py``); ``$OMNISIFT_GOLDEN`` points elsewhere."""
    candidates = [Path(__file__).resolve().parents[1].parent / "shared/golden/release_masks.pt"]
    if os.environ.get("OMNISIFT_GOLDEN"):
        candidates.append(Path(os.environ["OMNISIFT_GOLDEN"]))
    return next((p for p in candidates if p.is_file()), None)


def pytest_generate_tests(metafunc):  # noqa: D103  (pytest hook, local to this module)
    if "workload" in metafunc.fixturenames:
        metafunc.parametrize("workload", _workloads(metafunc.config))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("preset", ["paper-35", "paper-25"])
@pytest.mark.parametrize("provider", E2E_PROVIDERS)
def test_end_to_end(benchmark, provider, workload, preset):
    if _AVAIL[provider] is not None:
        pytest.skip(f"{provider}: {_AVAIL[provider]}")
    cases = _FACTORY.cases(workload, DTYPE, preset, DEVICE, [0, 1])
    fns = [PROVIDERS[provider].e2e(c) for c in cases]
    # Agreement before timing, as in the CLI. The reference provider is the oracle itself (comparing
    # it with itself proves nothing): timed only; tests/test_golden.py checks it against the release.
    if provider != "reference":
        refs = [compress(**c.kwargs(), backend="reference").keep_mask for c in cases]
        for fn, ref in zip(fns, refs):
            assert torch.equal(fn(), ref), f"{provider} keep mask differs from the reference on {workload} {preset}"
    state = {"i": 0}

    def run():
        state["i"] += 1
        out = fns[state["i"] % len(fns)]()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"e2e {workload} {DTYPE} {preset}"
    benchmark.extra_info.update(provider=provider, workload=workload, dtype=DTYPE, preset=preset)
    benchmark(run)


def test_release_loop_matches_golden_masks():
    """The release-style baseline reproduces the masks produced by the authors' released code."""
    path = golden_path()
    if path is None:
        pytest.skip("golden masks not found: neither ../shared/golden/release_masks.pt nor $OMNISIFT_GOLDEN exists")
    for c in torch.load(path, weights_only=False):
        s = c["selector"]
        sel = VisionGuidedAudioSelector(s["d_model"], s["num_heads"], s["hidden_dim"])
        sel.load_state_dict(s["state_dict"])
        keep, _ = release_loop_compress(
            c["inputs_embeds"], c["input_ids"], c["position_ids"], video_token_id=c["video_token_id"],
            audio_token_id=c["audio_token_id"], rho_video=c["rho_video"], rho_audio=c["rho_audio"],
            selector=sel.eval(), attention_mask=c["attention_mask"], gather=False,
        )
        assert torch.equal(keep, c["keep_mask"]), c.get("source")


@pytest.mark.parametrize("provider", ["reference", "release-loop"])
def test_stage_chain_matches_reference(provider):
    """The per-stage callables the CLI times compose to the reference keep mask."""
    from bench.stages import STAGE_HOOKS, STAGES

    case = _FACTORY.cases("tiny", DTYPE, "paper-35", DEVICE, [0])[0]
    stages = STAGE_HOOKS[provider](case)
    assert set(STAGES) <= set(stages)
    for name in STAGES:
        stages[name]()
    ref = compress(**case.kwargs(), backend="reference").keep_mask
    assert torch.equal(stages["_keep_mask"](), ref)
