"""Each Triton kernel against its plain-torch reference on random inputs at small sizes (under
Triton's interpreter on CPU: TRITON_INTERPRET=1 is set in conftest.py before any kernel exists)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from modgen.kernels import interpreting
from modgen.kernels.kv_write import rope_kv_write, rope_kv_write_ref
from modgen.kernels.launch import config
from modgen.kernels.paged_attention import (
    choose_num_splits,
    cut_tiles,
    paged_attention,
)
from modgen.kernels.paged_attention_ref import paged_attention_ref
from modgen.kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_ref
from modgen.kernels.swiglu import swiglu, swiglu_ref
from modgen.kernels.testing import PagedBatch, padded_batch, plan_for, random_batch

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)

# Six chunks: decodes (one at position 0), a whole prompt, and prompt chunks at an offset that
# cross block boundaries for every block size used (positions 28..39 cross 30 and 32).
Q_LENS = [1, 7, 1, 12, 3, 1]
CTX_LENS = [9, 7, 20, 40, 13, 1]


def make_ragged(q_lens, ctx_lens, block_size, seed=0) -> tuple[PagedBatch, int]:
    return random_batch(q_lens, ctx_lens, block_size, seed, DEVICE)


def random_qkv_cache(num_tokens, num_slots, heads, kv_heads, head_dim, dtype=torch.float32):
    """q [T, Hq, D] and filled K/V caches [slots, Hkv, D] (stale values in unused slots too)."""
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)

    return rand(num_tokens, heads, head_dim), *(rand(num_slots, kv_heads, head_dim) for _ in "kv")


def attention_case(batch, num_slots, group, window, splits, block_m, block_n, dtype, d=32):
    q, k_cache, v_cache = random_qkv_cache(batch.num_tokens, num_slots, 2 * group, 2, d, dtype)
    plan = plan_for(batch, block_m=block_m, num_splits=splits)
    out = paged_attention(q, k_cache, v_cache, plan, d**-0.5, window, config(BLOCK_N=block_n))
    ref = paged_attention_ref(
        q, k_cache, v_cache, batch.query_start, batch.context_lens, batch.block_tables,
        batch.block_size, d**-0.5, window,
    )  # fmt: skip
    return out, ref


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_paged_attention_matches_reference(block_size, group, window):
    batch, num_slots = make_ragged(Q_LENS, CTX_LENS, block_size)
    out, ref = attention_case(batch, num_slots, group, window, 1, 32, 16, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("splits", "block_m", "block_n", "window"),
    [(2, 64, 16, None), (3, 16, 32, 6), (8, 32, 16, None)],  # 8: some splits see nothing
)
def test_split_kv_matches_reference(splits, block_m, block_n, window):
    batch, num_slots = make_ragged(Q_LENS, CTX_LENS, 5)
    out, ref = attention_case(batch, num_slots, 4, window, splits, block_m, block_n, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("head_dim", "splits"), [(20, 1), (80, 2), (8, 1)])
def test_paged_attention_any_head_dim(head_dim, splits):
    """Head dims that are not powers of two (Phi-2's 80) or under tl.dot's 16: padded lanes."""
    batch, num_slots = make_ragged(Q_LENS, CTX_LENS, 5)
    out, ref = attention_case(batch, num_slots, 2, 6, splits, 16, 16, torch.float32, head_dim)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_half_precision():
    batch, num_slots = make_ragged(Q_LENS, CTX_LENS, 5)
    out, ref = attention_case(batch, num_slots, 4, 6, 2, 32, 16, torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("window", [None, 6])
def test_padded_batch_is_the_same_step(window):
    """The GPU check's SDPA baseline (a padded batch) computes what the reference does."""
    batch, num_slots = make_ragged(Q_LENS, CTX_LENS, 5)
    q, k_cache, v_cache = random_qkv_cache(batch.num_tokens, num_slots, 8, 2, 32)
    qp, kp, vp, mask = padded_batch(q, k_cache, v_cache, batch, window)
    out = F.scaled_dot_product_attention(qp, kp, vp, mask, scale=0.2, enable_gqa=True)
    offset = torch.arange(batch.num_tokens, device=DEVICE) - batch.query_start[batch.seq_index]
    ref = paged_attention_ref(
        q, k_cache, v_cache, batch.query_start, batch.context_lens, batch.block_tables, 5, 0.2,
        window,
    )  # fmt: skip
    torch.testing.assert_close(out.transpose(1, 2)[batch.seq_index, offset], ref)


def test_tiles_and_split_choice():
    seq, start = cut_tiles(torch.tensor([0, 3, 4, 9]), 2)  # chunks of 3, 1 and 5 tokens
    assert seq.tolist() == [0, 0, 1, 2, 2, 2]
    assert start.tolist() == [0, 2, 3, 4, 6, 8]
    assert choose_num_splits(256, 4096, 132, 16, 256) == 1  # enough programs already
    assert choose_num_splits(8, 4096, 132, 16, 256) == 16  # few long sequences: split
    assert choose_num_splits(8, 300, 132, 16, 256) == 1  # short contexts: not worth it


def rope_inputs(num_tokens, heads, kv_heads, head_dim, dtype, rot=None):
    """q, k, v as views of one packed projection (as the model has them) and cos/sin [T, 1, R]
    for the first R = ``rot`` dims (all by default)."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.to(dtype=dtype, device=DEVICE).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1
    )
    rot = rot or head_dim
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    freqs = torch.randint(0, 200, (num_tokens, 1)).float() * inv_freq  # [T, R/2]
    emb = torch.cat((freqs, freqs), -1)[:, None, :].to(device=DEVICE)  # [T, 1, R]
    views = (x.view(num_tokens, -1, head_dim) for x in (q, k, v))
    return *views, (emb.cos().to(dtype), emb.sin().to(dtype))


@pytest.mark.parametrize(
    ("dtype", "fused_rope", "head_dim", "rot"),
    [(torch.float32, True, 32, 32), (torch.float32, False, 32, 32), (torch.float16, True, 32, 32),
     (torch.float16, False, 32, 32), (torch.float32, True, 20, 8), (torch.float32, True, 80, 32),
     (torch.float32, False, 80, 32), (torch.float32, True, 24, 24)],
)  # fmt: skip
def test_rope_kv_write_matches_reference(dtype, fused_rope, head_dim, rot):
    """Full and partial rotary (Phi-2: 32 of 80 dims), head dims that are not powers of two."""
    q, k, v, rope = rope_inputs(13, 8, 2, head_dim, dtype, rot)
    rope = rope if fused_rope else None
    slots = torch.randperm(40)[:13].to(DEVICE)
    _, k_cache, v_cache = random_qkv_cache(0, 40, 1, 2, head_dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_out = rope_kv_write(q, k, v, k_cache, v_cache, slots, rope, config(BLOCK_T=8))
    q_ref = rope_kv_write_ref(q, k, v, k_ref, v_ref, slots, rope)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(k_cache, k_ref, **tol)  # untouched slots included
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_matches_reference(dtype, residual):
    gen = torch.Generator().manual_seed(3)
    x, r = (torch.randn(3, 5, 96, generator=gen).to(dtype=dtype, device=DEVICE) for _ in "xr")
    weight = torch.randn(96, generator=gen).to(dtype=dtype, device=DEVICE)
    # bfloat16: the interpreter rounds float32 -> bf16 by truncation; allow a unit or two
    tol = {"rtol": 0.02, "atol": 0.05} if dtype == torch.bfloat16 else {}
    ref, h_ref = rms_norm_ref(x, weight, 1e-5, r if residual else None)
    if residual:
        out, h = add_rms_norm(x, r, weight, 1e-5)
        torch.testing.assert_close(h, h_ref, **tol)
    else:
        out = rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    gate_up = (3 * torch.randn(4, 3, 200, generator=gen)).to(dtype=dtype, device=DEVICE)
    out = swiglu(gate_up, config(BLOCK=32))  # 100 columns: four tiles, the last partial
    torch.testing.assert_close(out, swiglu_ref(gate_up))
    torch.testing.assert_close(swiglu(gate_up), swiglu_ref(gate_up))  # default config


def test_gpu_check_runs_at_toy_sizes(capsys):
    from modgen.kernels import gpu_check

    assert gpu_check.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "attention: decode" in out and "SwiGLU" in out and "FAIL" not in out


def test_gpu_check_says_it_needs_cuda(monkeypatch):
    from modgen.kernels import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_check.main([])
