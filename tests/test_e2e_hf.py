"""The oracle: greedy generations token for token against Hugging Face transformers on the same
weights, for every model, scheduler, token budget and block size; last-prompt-token logits within
float tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import MAX_NEW

from modgen import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)

SCHEDULES = [
    ["+scheduler=splitfuse", "scheduler.token_budget=7"],
    ["+scheduler=splitfuse", "scheduler.token_budget=33"],
    ["+scheduler=splitfuse", "scheduler.token_budget=1000", "scheduler.max_num_seqs=3"],
    ["+scheduler=continuous"],
    ["+scheduler=static", "scheduler.max_num_seqs=3"],
]


def capture_first_logits(llm: LLM) -> dict[str, torch.Tensor]:
    """Record each request's logits when its first token is sampled."""
    captured: dict[str, torch.Tensor] = {}
    sample = llm.engine.executor.sampler.sample

    def spy(logits, seqs, banned):
        for row, seq in zip(logits, seqs, strict=True):
            if seq.num_output_tokens == 0 and seq.request_id not in captured:
                captured[seq.request_id] = row.float().clone()
        return sample(logits, seqs, banned)

    llm.engine.executor.sampler.sample = spy
    return captured


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(s).replace("+", ""))
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_matches_transformers(
    kind, schedule, block_size, checkpoints, prompts, hf_reference
):
    llm = LLM(
        kind,
        checkpoint=str(checkpoints[kind]),
        overrides=[
            *schedule,
            f"kv_allocator.block_size={block_size}",
            "kv_allocator.num_blocks=512",
        ],
    )
    logits = capture_first_logits(llm)
    outs = llm.generate(prompts, GREEDY)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(outs, hf_reference[kind], strict=True)):
        assert out.token_ids == ref_tokens, f"prompt {i} (len {len(prompts[i])}) diverged"
        assert out.finish_reason == "length"
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=1e-4, atol=1e-4)


def test_mistral_window_is_shorter_than_prompts(checkpoints, prompts):
    """The sliding window really is exercised: it is shorter than most prompts."""
    llm = LLM("mistral", checkpoint=str(checkpoints["mistral"]))
    window = llm.engine.executor.model.sliding_window
    assert window is not None
    assert sum(len(p) > window for p in prompts) >= 5


def test_kv_pressure_preempts_and_stays_exact(checkpoints, prompts, hf_reference):
    """With a cache that holds only a few sequences, requests are preempted and recomputed, and
    the outputs are still exactly HF's."""
    llm = LLM(
        "llama",
        checkpoint=str(checkpoints["llama"]),
        overrides=[
            "+scheduler=splitfuse",
            "scheduler.token_budget=16",
            "kv_allocator.block_size=4",
            "kv_allocator.num_blocks=20",  # 80 slots: the longest request needs 74
        ],
    )
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [ref for ref, _ in hf_reference["llama"]]
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert llm.engine.kv.num_free_blocks == 20


def test_sharded_checkpoint_loads_the_same(ckpt_dir, prompts):
    from checkpoints import hf_greedy, hf_model, make_checkpoint

    path = make_checkpoint(ckpt_dir / "sharded", "mistral", seed=7, shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    hf = hf_model(path)
    llm = LLM("mistral", checkpoint=str(path), overrides=["+scheduler=splitfuse"])
    outs = llm.generate(prompts[:4], GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, MAX_NEW)[0] for p in prompts[:4]]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_tracks_fp32(dtype, checkpoints, prompts, hf_reference):
    llm = LLM("llama", checkpoint=str(checkpoints["llama"]), overrides=[f"model.dtype={dtype}"])
    assert llm.engine.executor.model.dtype == getattr(torch, dtype)
    logits = capture_first_logits(llm)
    outs = llm.generate(prompts[:3], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    for out, (_, ref_logits) in zip(outs, hf_reference["llama"], strict=False):
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=0.1, atol=0.15)


def test_text_prompts_use_the_checkpoint_tokenizer(checkpoints):
    llm = LLM("mistral", checkpoint=str(checkpoints["mistral"]))
    out = llm.generate(
        ["w5 w6 w7 w8"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    )
    assert out[0].prompt_token_ids == [5, 6, 7, 8]
    assert out[0].text == llm.tokenizer.decode(out[0].token_ids, skip_special_tokens=True)
    assert len(out[0].text.split()) >= 1
