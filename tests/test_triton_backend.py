"""``attention=triton``: what it declares it supports, that importing it needs no Triton, that it
computes what the torch backend does, and greedy generation token for token with transformers
(kernels under Triton's interpreter on CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from batches import random_step
from checkpoints import FAMILIES
from test_e2e_hf import GREEDY, capture_first_logits
from test_kernels import CTX_LENS, DEVICE, Q_LENS, random_qkv_cache, rope_inputs

from modgen import LLM, registry
from modgen.attention import AttentionSpec
from modgen.plugins.attention import triton as triton_plugin
from modgen.plugins.attention.torch_ref import TorchAttention
from modgen.plugins.attention.triton import TritonAttention
from modgen.plugins.models.blocks.position import rotate


def spec(**changes) -> AttentionSpec:
    base = dict(num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=DEVICE)
    return AttentionSpec(**{**base, "sliding_window": None, **changes})


def backend(**config) -> TritonAttention:
    return registry.build("attention", {"name": "triton", "autotune": False, **config})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (dict(head_dim=320), "head_dim 320 is not supported: at most 256"),
        (dict(rotary_dim=7, head_dim=20), "rotary_dim 7 is not an even number"),
        (dict(dtype=torch.float64), "dtype torch.float64 is not supported"),
        (dict(dtype=torch.bfloat16), "bfloat16 does not run under Triton's interpreter"),
        (dict(device=torch.device("meta")), "device 'meta' is not supported"),
        (dict(num_heads=6, num_kv_heads=4), "6 query heads do not group evenly over 4"),
    ],
)
def test_check_says_why_it_cannot_run(changes, reason):
    if "bfloat16" in reason and DEVICE != "cpu":
        pytest.skip("bfloat16 runs on GPUs")
    backend().check(spec())  # supported: no error
    with pytest.raises(ValueError, match=reason):
        backend().check(spec(**changes))


def test_check_needs_the_interpreter_on_cpu_and_triton_installed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"need a CUDA GPU; on CPU .* TRITON_INTERPRET=1"):
        backend().check(spec(device=torch.device("cpu")))
    monkeypatch.setattr(triton_plugin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="Triton is not installed"):
        backend().check(spec())


@pytest.mark.parametrize("bad", ["block_m=48", "block_n=8", "num_warps=3", "num_splits=0"])
def test_config_rejects_bad_values(bad):
    key, value = bad.split("=")
    with pytest.raises(ValueError, match=f"attention.{key}"):
        backend(**{key: int(value)})


def test_import_is_cheap_and_works_without_triton():
    code = """
import sys, torch
from modgen import registry
from modgen.attention import AttentionSpec
from modgen.plugins.attention.triton import TritonAttention, unsupported_reason
assert registry.get("attention", "triton") is TritonAttention
assert "triton" not in sys.modules, "importing the plugin imported Triton"
sys.modules["triton"] = None  # as if Triton were not installed
print(unsupported_reason(AttentionSpec(8, 2, 64, torch.float32, torch.device("cpu"), None)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Triton is not installed" in out.stdout


@pytest.mark.parametrize("window", [None, 6])
def test_forward_matches_the_torch_backend(window):
    """Un-rotated q/k with rope: the same output and the same cache as rotate + torch backend."""
    batch, num_slots = random_step(Q_LENS, CTX_LENS, 5, device=DEVICE)
    q, k, v, rope = rope_inputs(batch.num_tokens, 8, 2, 32, torch.float32)
    _, *cache = random_qkv_cache(0, num_slots, 1, 2, 32)
    ref_cache = [c.clone() for c in cache]
    triton_attn = backend(num_splits=2, block_m=16)
    out = triton_attn.forward(
        q, k, v, cache, batch, triton_attn.prepare(batch), 0.2, window, rope=rope
    )
    torch_attn = TorchAttention(TorchAttention.Config())
    q_rot, k_rot = rotate(q, *rope), rotate(k, *rope)
    ref = torch_attn.forward(
        q_rot, k_rot, v, ref_cache, batch, torch_attn.prepare(batch), 0.2, window
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(cache, ref_cache, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


E2E = [  # block sizes 5 and 4 make chunks cross block boundaries; mistral's window is 8
    ("mistral", ["+scheduler=splitfuse", "scheduler.token_budget=33", "kv_allocator.block_size=5"]),
    ("llama", ["+scheduler=splitfuse", "scheduler.token_budget=33", "kv_allocator.block_size=4",
               "attention.num_splits=2"]),  # split-KV path
]  # fmt: skip


@pytest.mark.parametrize(("kind", "overrides"), E2E, ids=[k for k, _ in E2E])
def test_greedy_matches_transformers(kind, overrides, checkpoints, prompts, hf_reference):
    llm = LLM(
        kind,
        checkpoint=str(checkpoints[kind]),
        overrides=["attention=triton", "attention.autotune=false", *overrides,
                   "kv_allocator.num_blocks=512", f"engine.device={DEVICE}"],
    )  # fmt: skip
    assert llm.engine.executor.attn.registry_name == "triton"
    logits = capture_first_logits(llm)
    outs = llm.generate(prompts, GREEDY)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, hf_reference[kind], strict=True)):
        assert out.token_ids == ref_tokens, f"prompt {i} (len {len(prompts[i])}) diverged"
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=1e-4, atol=1e-4)


TRITON_FAMILIES = list(FAMILIES)
"""Among them: head dim 20 with partial rotary (phi), windows on some layers (qwen2), grouped q/k/v
(falcon_new), no RoPE (opt), longrope and windows (phi3), q/k norms and head dim 24 (qwen3)."""


@pytest.mark.parametrize("kind", TRITON_FAMILIES)
def test_families_match_transformers(kind, zoo):
    from test_families import run

    llm = run(zoo, kind, ["attention=triton", "attention.autotune=false", "+scheduler=splitfuse",
                          "scheduler.token_budget=16", "kv_allocator.block_size=5",
                          f"engine.device={DEVICE}"])  # fmt: skip
    assert llm.engine.executor.attn.registry_name == "triton"
