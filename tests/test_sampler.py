"""Sampling parameters per row: greedy, temperature, top-k, top-p, seeds, stops, min/max tokens."""

from __future__ import annotations

import math

import pytest
import torch
from sim_engine import make_seq

from modgen import LLM, SamplingParams
from modgen.engine.sampler import Sampler


def seq_with(i: int, **params):
    s = make_seq(i, 3, 5)
    s.params = SamplingParams(**params)
    return s


def test_greedy_rows_take_argmax_and_sampled_rows_stay_in_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    seqs = [
        seq_with(0, temperature=0),
        seq_with(1, temperature=1.0, top_k=1),
        seq_with(2, temperature=1.0, top_k=3, seed=1),
        seq_with(3, temperature=1.0, top_p=1e-6, seed=2),
    ]
    sampler = Sampler(0)
    top3 = set(logits[2].topk(3).indices.tolist())
    for _ in range(50):
        out = sampler.sample(logits.clone(), seqs, [[]] * 4)
        assert out[0] == int(logits[0].argmax())
        assert out[1] == int(logits[1].argmax())
        assert out[2] in top3
        assert out[3] == int(logits[3].argmax())  # tiny top_p keeps only the most likely


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(0)
    seq = seq_with(0, temperature=1.0, seed=3)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sampler.sample(logits.clone(), [seq], [[]])[0]] += 1
    expected = torch.softmax(logits[0], 0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 for 3 degrees of freedom


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    sampler = Sampler(0)
    seq = seq_with(0, temperature=1.0, top_p=0.75, seed=5)
    seen = {sampler.sample(logits.clone(), [seq], [[]])[0] for _ in range(300)}
    assert seen == {0, 1}


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e300},
        {"temperature": 1e-300},
        {"temperature": 1.0, "top_k": 2**63},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 0.7, "top_k": 3, "top_p": 1e-9, "seed": 2**63 - 1},
    ],
)
def test_extreme_valid_parameters_sample_a_token_in_the_vocabulary(params):
    logits = torch.tensor([[3.0, 1.0, float("-inf"), 0.5, -2.0]])
    seq = seq_with(0, **params)
    for banned in ([], [0], [0, 1, 3, 4]):
        token = Sampler(0).sample(logits.clone(), [seq], [banned])[0]
        assert 0 <= token < 5


def test_a_temperature_beyond_float32_samples_uniformly_not_nan():
    logits = torch.tensor([[5.0, 0.0, -5.0]])
    seq = seq_with(0, temperature=1e300, seed=4)
    sampler = Sampler(0)
    seen = {sampler.sample(logits.clone(), [seq], [[]])[0] for _ in range(60)}
    assert seen == {0, 1, 2}


def test_banned_ids_are_never_sampled():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    sampler = Sampler(0)
    assert sampler.sample(logits.clone(), [seq_with(0, temperature=0)], [[0]])[0] != 0


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(
        "mistral", checkpoint=str(checkpoints["mistral"]), overrides=["+scheduler=splitfuse"]
    )


def test_same_seed_same_output_whatever_the_batch(llm, prompts):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = llm.generate([prompts[3]], p)[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True)
    batch = llm.generate([prompts[0], prompts[3], prompts[5]], [others, p, others])
    assert batch[1].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    assert llm.generate([prompts[3]], other_seed)[0].token_ids != alone


def test_stop_token_ids_min_tokens_and_max_tokens(llm, prompts):
    greedy = llm.generate(
        [prompts[4]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    )
    toks = greedy[0].token_ids
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = llm.generate(
        [prompts[4]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == toks[: first + 1]
    # min_tokens suppresses the stop token until that many tokens exist
    out = llm.generate(
        [prompts[4]],
        SamplingParams(
            max_tokens=10, min_tokens=first + 2, temperature=0, stop_token_ids=[stop_at]
        ),
    )[0]
    assert len(out.token_ids) >= first + 2
    assert stop_at not in out.token_ids[: first + 2]
    out = llm.generate([prompts[4]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[
        0
    ]
    assert (len(out.token_ids), out.finish_reason) == (4, "length")


def test_eos_stops_unless_ignored(llm, prompts):
    eos = llm.engine.spec.eos_token_ids[0]
    ids = llm.generate([prompts[2]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    run = ids[0].token_ids
    out = llm.generate([prompts[2]], SamplingParams(max_tokens=40, temperature=0))[0]
    if eos in run:
        assert out.token_ids == run[: run.index(eos) + 1] and out.finish_reason == "stop"
    else:
        assert out.token_ids == run and out.finish_reason == "length"


def test_stop_strings_cut_the_text(llm, prompts):
    full = llm.generate([prompts[4]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    words = full[0].text.split()
    assert len(words) >= 4
    out = llm.generate(
        [prompts[4]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[words[2]])
    )[0]
    assert out.finish_reason == "stop"
    assert words[2] not in out.text.split()
    assert out.text.split() == words[: words.index(words[2])]
    assert not math.isnan(out.metrics.ttft)


def test_stop_strings_decode_a_tail_not_the_whole_output(llm, prompts):
    """A long generation with a stop string is not re-decoded whole at every step: past the first
    steps only a window of tokens is decoded, and a match in it still stops the request."""
    tok = llm.engine.tokenizer
    decode, lengths = tok.decode, []

    def spy(ids, **kw):
        lengths.append(len(ids))
        return decode(ids, **kw)

    tok.decode = spy
    try:
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, stop=["never"])
        out = llm.generate([prompts[4]], params)[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 60
        window = 2 * len("never") + 8
        assert sum(n > window + 1 for n in lengths) == 1  # the final text, once
        full = out.text.split()
        lengths.clear()
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, stop=[full[40]])
        stopped = llm.generate([prompts[4]], params)[0]
    finally:
        tok.decode = decode
    assert stopped.finish_reason == "stop"
    assert stopped.text.split() == full[: full.index(full[40])]
