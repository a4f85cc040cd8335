"""python/train.py: JSONL data, checkpoint save/resume, and 2-process gloo DDP (tiny random model, CPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "python", "train.py")


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("omnisift_train_script", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _base(save_dir, steps, *extra):
    return ["--tiny-random", "--device", "cpu", "--steps", str(steps), "--save-dir", str(save_dir), "--no-progress",
            "--synthetic-samples", "4", "--rho-video", "0.5", "--rho-audio", "0.5", "--lr", "1e-2", *extra]


def test_jsonl_schema_roundtrip(train, tmp_path):
    from omnisift_kernels.testing.qwen2_5_omni import tiny_thinker_config

    cfg = tiny_thinker_config()
    path = train.write_synthetic(cfg, str(tmp_path), 3, seed=0)
    ds = train.JsonlDataset(path)
    ref = train.synthetic_samples(cfg, 3, seed=0)
    assert len(ds) == 3
    for i in range(3):
        got = ds[i]
        for k in ("input_ids", "attention_mask", "labels", "input_features", "pixel_values_videos", "video_grid_thw"):
            assert torch.equal(got[k], ref[i][k]), (i, k)


def test_checkpoint_save_resume_roundtrip(train, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    full = train.main(_base(a, 4, "--save-every", "2"))
    assert sorted(os.listdir(a)) == ["checkpoint-2.pt", "checkpoint-4.pt", "compressor.safetensors"]
    first = train.main(_base(b, 2, "--save-every", "2"))
    resumed = train.main(_base(b, 4, "--save-every", "2", "--resume", "auto"))
    assert resumed["step"] == 4 and len(resumed["losses"]) == 2
    assert first["losses"] == full["losses"][:2]
    assert resumed["losses"] == full["losses"][2:]
    ca = torch.load(a / "checkpoint-4.pt", weights_only=True)
    cb = torch.load(b / "checkpoint-4.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 4
    for k, v in ca["compressor"].items():
        assert torch.equal(v, cb["compressor"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    # The release-format export loads into a fresh wrapper.
    from omnisift_kernels.integrations import qwen2_5_omni as q
    from omnisift_kernels.testing.qwen2_5_omni import tiny_random_thinker

    w = q.OmniSIFTThinker(tiny_random_thinker(seed=0))
    q.load_compressor_from_checkpoint(w, str(b / "compressor.safetensors"))
    for k, v in w.selector.state_dict().items():
        assert torch.equal(v, cb["compressor"][k]), k


def test_train_llm_checkpoint(train, tmp_path):
    train.main(_base(tmp_path, 1, "--train-llm", "--layout", "packed"))
    ck = torch.load(tmp_path / "checkpoint-1.pt", weights_only=True)
    assert "llm" in ck and "lm_head.weight" in ck["llm"]
    from omnisift_kernels.testing.qwen2_5_omni import tiny_random_thinker

    assert not torch.equal(ck["llm"]["lm_head.weight"], tiny_random_thinker(seed=0).lm_head.weight)


def test_ddp_two_processes_identical_parameters(train, tmp_path):
    from omnisift_kernels.selector import VisionGuidedAudioSelector
    from omnisift_kernels.testing.qwen2_5_omni import tiny_thinker_config

    data = train.write_synthetic(tiny_thinker_config(), str(tmp_path / "data"), 4, seed=0)
    save = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           TRAIN, "--tiny-random", "--device", "cpu", "--data", data, "--steps", "2", "--save-dir", str(save), "--save-rank-params",
           "--no-progress", "--log-every", "1", "--rho-video", "0.5", "--rho-audio", "0.5", "--lr", "1e-2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout
    r0 = torch.load(save / "rank0_params.pt", weights_only=True)
    r1 = torch.load(save / "rank1_params.pt", weights_only=True)
    assert r0.keys() == r1.keys() and any(k.endswith("compressor.v_proj.weight") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    torch.manual_seed(0)
    init = VisionGuidedAudioSelector(32).state_dict()
    assert not torch.equal(r0["thinker.compressor.score_head.2.weight"], init["score_head.2.weight"])
    assert (save / "checkpoint-2.pt").exists()
