"""The last layer computes only the rows that need logits: every row's keys and values are
written (later steps read them), but attention, the output projection and the MLP run on the
sampled rows alone. Checked at the attention backends (a batch of some rows alone attends as
those rows of the whole batch, and writes the same cache) and in the model (the last layer's
MLP sees the sampled rows, the others every row, and the tokens stay transformers')."""

from __future__ import annotations

import pytest
import torch
from batches import random_step
from test_cpu_backend import qkv_rope
from test_e2e_hf import GREEDY, capture_first_logits

from modgen import LLM, registry
from modgen.attention import AttentionBackend
from modgen.kernels import cpu
from modgen.plugins.models.blocks.layers import PreNormLayer

BACKENDS = ["torch", *(f"cpu/{isa}" for isa in cpu.machine_isas()[:2])]


def backend(label: str) -> AttentionBackend:
    name, _, isa = label.partition("/")
    return registry.build("attention", {"name": name, **({"isa": isa} if isa else {})})


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("label", BACKENDS)
def test_some_rows_alone_attend_as_in_the_whole_batch(label, window):
    attn = backend(label)
    batch, num_slots = random_step([1, 9, 1, 20, 3], [30, 9, 7, 45, 3], block_size=5, seed=3)
    q, k, v, rope = qkv_rope(batch.num_tokens, 8, 2, 32, seed=4)
    gen = torch.Generator().manual_seed(5)
    whole = [torch.randn(num_slots, 2, 32, generator=gen) for _ in range(2)]
    alone = [c.clone() for c in whole]
    extra = {"rope": rope} if attn.fuses_rope else {}
    want = attn.forward(q, k, v, whole, batch, attn.prepare(batch), 0.2, window, **extra)

    rows = torch.tensor([0, 4, 9, 11, 30, 31, 33])  # sampled rows and rows inside chunks
    attn.write_kv(k, v, alone, batch, **extra)
    sub = batch.only_rows(rows)
    if attn.fuses_rope:
        extra = {"rope": (rope[0][rows], rope[1][rows])}
    qr, kr, vr = q[rows], k[rows], v[rows]
    got = attn.forward(qr, kr, vr, alone, sub, attn.prepare(sub), 0.2, window, **extra)
    torch.testing.assert_close(got, want[rows], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(alone, whole, strict=True):  # the very values forward writes
        assert torch.equal(mine, theirs)


def test_the_default_kv_write_rotates_as_the_kernel_does():
    """A backend that fuses RoPE and keeps the interface's cache layout needs no write of its
    own: the base class rotates in torch (the C++ kernel's own write is the reference)."""
    attn = backend(BACKENDS[1])
    batch, num_slots = random_step([4, 1, 7], [10, 3, 7], block_size=4, seed=6)
    _, k, v, rope = qkv_rope(batch.num_tokens, 4, 2, 32, seed=7)
    mine, theirs = ([torch.zeros(num_slots, 2, 32) for _ in range(2)] for _ in "ab")
    attn.write_kv(k, v, theirs, batch, rope)
    AttentionBackend.write_kv(attn, k, v, mine, batch, rope)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert mine[0].abs().sum() > 0


def row_counts(llm: LLM) -> list[tuple[int, int, int]]:
    """Per forward pass: rows into the first layer's MLP, the last layer's, and the LM head."""
    model = llm.engine.executor.model
    seen: list[list[int]] = []

    def first(_mod, args):
        seen.append([args[0].shape[0]])

    model.layers[0].mlp.register_forward_pre_hook(first)
    model.layers[-1].mlp.register_forward_pre_hook(lambda _m, a: seen[-1].append(a[0].shape[0]))
    model.lm_head.register_forward_pre_hook(lambda _m, a: seen[-1].append(a[0].shape[0]))
    return seen  # filled as the engine runs


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_the_last_layer_runs_only_the_rows_that_need_logits(
    kind, checkpoints, prompts, hf_reference
):
    budget = ["+scheduler=splitfuse", "scheduler.token_budget=7", "kv_allocator.block_size=5"]
    llm = LLM(kind, checkpoint=str(checkpoints[kind]), overrides=budget)
    seen = row_counts(llm)
    logits = capture_first_logits(llm)
    alone = llm.generate(prompts[-1:], GREEDY)  # its first steps are prompt chunks only
    assert alone[0].token_ids == hf_reference[kind][-1][0]
    outs = llm.generate(prompts, GREEDY)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, hf_reference[kind], strict=True)):
        assert out.token_ids == ref_tokens, f"prompt {i} (len {len(prompts[i])}) diverged"
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=1e-4, atol=1e-4)
    assert all(last == head <= rows for rows, last, head in seen), seen
    assert any(last == 0 < rows for rows, last, _ in seen)  # a step of prompt chunks only
    assert any(0 < last < rows for rows, last, _ in seen)


def test_a_layer_that_does_not_keep_rows_gets_them_all(monkeypatch, checkpoints, prompts):
    """A layout that does not declare ``keeps_rows`` (a researcher's, say) runs every row, and
    the model picks the sampled ones after it, as before; the tokens are the same."""
    kept = LLM("llama", checkpoint=str(checkpoints["llama"])).generate(prompts, GREEDY)
    monkeypatch.setattr(PreNormLayer, "keeps_rows", property(lambda self: False))
    llm = LLM("llama", checkpoint=str(checkpoints["llama"]))
    seen = row_counts(llm)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in kept]
    assert all(rows == last >= head for rows, last, head in seen), seen
    assert any(head < rows for rows, _, head in seen)
