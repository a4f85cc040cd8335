"""``python -m bench.prefill``: the prefill benchmark runs on a tiny text model and reports sane rows."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from bench import prefill  # noqa: E402
from omnisift_kernels.synthetic import make_workload  # noqa: E402


def test_prefill_tiny_rows(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    rc = prefill.main(["--workload", "tiny", "--shape", "tiny", "--device", "cpu", "--repeat", "2",
                       "--preset", "paper-35", "--preset", "paper-25", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "full prefill ms" in text and "tiny" in text
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["preset"] for r in rows] == ["paper-35", "paper-25"]
    batch = make_workload("tiny")
    total = int(batch.attention_mask.sum())
    for r in rows:
        assert r["tokens_full"] == total
        assert 0 < r["tokens_compressed"] < total
        for k in ("full_prefill_ms", "compress_ms", "compressed_prefill_ms"):
            assert r[k] > 0 and r[k.replace("_ms", "_p20_ms")] <= r[k] <= r[k.replace("_ms", "_p80_ms")]
        assert r["speedup"] == pytest.approx(r["full_prefill_ms"] / (r["compress_ms"] + r["compressed_prefill_ms"]))
    # the 25% preset keeps fewer tokens than the 35% one
    assert rows[1]["tokens_compressed"] < rows[0]["tokens_compressed"]


def test_prefill_shape_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden size 3584"):
        prefill.text_config("7b", 64, layers=1, vocab=16, attn="sdpa")


def test_prefill_7b_shape_config():
    cfg = prefill.text_config("7b", 3584, layers=None, vocab=16, attn="sdpa")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (3584, 18944, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (28, 4)


def test_prefill_out_of_memory_keeps_going_and_writes_json(tmp_path, monkeypatch):
    """An out-of-memory workload becomes an error row; the JSON is written after every workload."""
    import torch

    calls = []

    def fake(args, wl, *rest):
        calls.append(wl)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return [dict(workload=wl, preset="paper-35")]

    monkeypatch.setattr(prefill, "_run_workload", fake)
    out = tmp_path / "p.json"
    assert prefill.main(["--workload", "tiny", "--workload", "tiny", "--shape", "tiny", "--device", "cpu",
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["workload"] == "tiny" and rows[0]["error"].startswith("out of memory")
    assert rows[1] == dict(workload="tiny", preset="paper-35")


def test_time_fn_exact_repeat_counts_every_timed_call():
    import torch

    from bench.timing import time_fn

    seen = []
    t = time_fn(lambda i: seen.append(i), 1, torch.device("cpu"), repeat=4, warmup=2, exact_repeat=True)
    assert t.n == 4 and len(seen) == 6 and t.p20_ms <= t.median_ms <= t.p80_ms
