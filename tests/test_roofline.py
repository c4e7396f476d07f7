"""The roofline's cost model on hand-computed cases, and its place in bench results."""

from __future__ import annotations

import json

import pytest

from modgen.bench import roofline as rf
from modgen.bench.roofline import request_cost
from modgen.blocks.ops import linear_layouts
from modgen.engine.costs import attention_pairs
from modgen.machine import fingerprint
from modgen.model import ModelSpec


def spec(**kw) -> ModelSpec:
    return ModelSpec(
        **{
            "family": "llama",
            "vocab_size": 10,
            "max_position_embeddings": 64,
            "eos_token_ids": (),
            "sliding_window": None,
            "dtype": "float32",
            **kw,
        }
    )


def test_attention_pairs_causal_and_windowed():
    assert attention_pairs(0, 4, None) == 1 + 2 + 3 + 4
    assert attention_pairs(2, 2, None) == 3 + 4
    assert attention_pairs(0, 6, 3) == 1 + 2 + 3 + 3 + 3 + 3
    assert attention_pairs(4, 2, 3) == 3 + 3
    assert attention_pairs(1, 3, 3) == 2 + 3 + 3


def test_request_cost_counts_linear_head_and_attention():
    s = spec(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
             head_dim=4)  # fmt: skip
    # per layer: qkv 8*(8+4+4) + o 8*8 + mlp 3*8*16
    assert s.active_params_per_token() == 2 * (8 * 16 + 64 + 384)
    assert s.skipped_params_per_row() == 64 + 384  # the last layer's o and MLP
    flops, kv_bytes = request_cost(s, prompt=3, output=2)
    tokens = 4  # 3 prompt tokens + 1 generated token fed back
    pairs = 1 + 2 + 3 + 4
    # rows at positions 0 and 1 need no logits: in the last layer only their q/k/v projection
    # runs, and only the rows at 2 and 3 attend (3 and 4 keys)
    linear = 2 * s.active_params_per_token() * tokens - 2 * (64 + 384) * 2
    attention = 4 * 2 * 4 * (pairs + (3 + 4))
    assert flops == linear + 2 * 8 * 10 * 2 + attention
    assert kv_bytes == (4 + tokens) * s.kv_bytes_per_token()  # decode at pos 3 reads 4 + 4 writes


def test_roofline_efficiency_uses_the_cached_machine(monkeypatch):
    monkeypatch.setattr(rf, "machine", lambda: {"matmul_gflops": 100.0, "memory_gbps": 10.0})
    s = spec(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4,
             head_dim=16, vocab_size=100)  # fmt: skip
    out = rf.roofline(s, [(100, 10)], steps=10, wall_time=1.0)
    assert out["bound_compute_s"] == pytest.approx(out["flops"] / 100e9)
    assert out["bound_memory_s"] == pytest.approx(out["bytes"] / 10e9)
    assert out["bound_s"] == max(out["bound_compute_s"], out["bound_memory_s"])
    assert out["efficiency"] == pytest.approx(1.0 / out["bound_s"])


def test_machine_figures_measured_beside_busy_processes_are_not_cached(
    monkeypatch, tmp_path, other_load
):
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    measured = []

    def fake_measure():
        measured.append(1)
        return {"matmul_gflops": 150.0, "memory_gbps": 30.0, "fingerprint": fingerprint()}

    other_load.fraction = 0.5  # another process kept half the CPUs busy
    monkeypatch.setattr(rf, "measure_machine", fake_measure)
    assert rf.machine()["matmul_gflops"] == 150.0 and not (tmp_path / "machine.json").exists()
    other_load.fraction = 0.0
    rf.machine()
    assert (tmp_path / "machine.json").exists() and len(measured) == 2
    rf.machine()  # read back from the cache
    assert len(measured) == 2


def test_the_machine_rate_is_the_best_gemm_the_engine_may_run():
    m = rf.measure_machine(size=128, repeats=1)
    assert set(m["matmul_gflops_by_gemm"]) <= {"torch.mm", *linear_layouts()}
    assert {"torch.mm", "cpp"} <= set(m["matmul_gflops_by_gemm"])  # modgen's own GEMM too
    assert m["matmul_gflops"] == max(m["matmul_gflops_by_gemm"].values())
    assert m["format"] == rf.MEASURE_FORMAT


def test_a_cached_measurement_of_another_format_is_taken_again(monkeypatch, tmp_path):
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))
    old = {"matmul_gflops": 1.0, "memory_gbps": 1.0, "fingerprint": fingerprint(), "format": 1}
    (tmp_path / "machine.json").write_text(json.dumps(old))
    new = {"matmul_gflops": 150.0, "memory_gbps": 30.0, "fingerprint": fingerprint()}
    monkeypatch.setattr(rf, "measure_machine", lambda: new)
    assert rf.machine()["matmul_gflops"] == 150.0
    assert rf.machine()["format"] == rf.MEASURE_FORMAT  # cached in the current format
