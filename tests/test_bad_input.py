"""Bad input gets a clear error naming the problem; a running engine keeps serving the others."""

from __future__ import annotations

import shutil

import pytest
from conftest import MAX_NEW
from safetensors.torch import load_file, save_file

from modgen import LLM, BadRequestError, SamplingParams
from modgen.weights import WeightLoadError

GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
TINY_PRESET = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=1",
    "model.vocab_size=100",
]


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(
        "mistral", checkpoint=str(checkpoints["mistral"]), overrides=["+scheduler=splitfuse"]
    )


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([5] * 256, "context is 256 tokens"),
        ([], "non-empty"),
        ([5, 96, 7], r"outside the vocabulary \[0, 96\): \[96\]"),
        ([5, -1], "outside the vocabulary"),
        ([5, "x"], "outside the vocabulary"),
    ],
)
def test_bad_prompts_are_named(llm, prompt, match):
    with pytest.raises(BadRequestError, match=match) as err:
        llm.engine.add_request(prompt, GREEDY)
    assert err.value.field == "prompt"
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("priority", ["high", 1.5, None, True])
def test_a_priority_that_is_not_an_integer_is_named(llm, priority):
    with pytest.raises(BadRequestError, match="priority must be an integer") as err:
        llm.engine.add_request([5, 6], GREEDY, priority=priority)
    assert err.value.field == "priority"
    assert not llm.engine.has_unfinished()
    seq = llm.engine.add_request([5, 6], GREEDY, priority=-3)  # negative is fine: served first
    assert seq.priority == -3
    llm.engine.abort(seq.request_id)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_parameters_are_named(params, field):
    with pytest.raises(BadRequestError, match=field) as err:
        SamplingParams(**params)
    assert err.value.field == field


def test_kv_cache_too_small_for_a_request(checkpoints):
    llm = LLM(
        "mistral",
        checkpoint=str(checkpoints["mistral"]),
        overrides=["kv_allocator.num_blocks=2", "kv_allocator.block_size=4"],
    )
    with pytest.raises(BadRequestError, match="exceeds the KV cache"):
        llm.engine.add_request([5] * 6, SamplingParams(max_tokens=5))


def test_a_bad_request_fails_alone_in_a_running_engine(llm, prompts, hf_reference):
    engine = llm.engine
    seqs = [engine.add_request(p, GREEDY) for p in prompts[:4]]
    engine.step()
    engine.step()
    with pytest.raises(BadRequestError, match="vocabulary"):
        engine.add_request([1, 2, 10_000], GREEDY)
    with pytest.raises(BadRequestError, match="top_p"):
        engine.add_request([1, 2], SamplingParams(top_p=2.0))
    late = engine.add_request(prompts[4], GREEDY)  # the engine still accepts good requests
    aborted = engine.add_request(prompts[5], GREEDY)
    engine.step()
    assert engine.abort(aborted.request_id)
    assert not engine.kv.block_table(aborted.seq_id)
    while engine.has_unfinished():
        engine.step()
    for seq, (ref, _) in zip([*seqs, late], hf_reference["mistral"][:5], strict=True):
        assert seq.output_token_ids == ref
    assert aborted.finish_reason.value == "abort"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    for s in [*seqs, late, aborted]:
        engine.release(s.request_id)


def test_generate_names_the_bad_prompt_and_leaves_nothing_behind(llm, prompts):
    with pytest.raises(BadRequestError, match=r"prompt 2: .*vocabulary"):
        llm.generate([prompts[0], prompts[1], [99999], prompts[2]], GREEDY)
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    assert llm.generate([prompts[0]], GREEDY)[0].finish_reason == "length"


def test_text_prompt_and_stop_strings_need_a_tokenizer():
    llm = LLM("mistral", overrides=TINY_PRESET)  # random weights, no tokenizer
    with pytest.raises(BadRequestError, match="need a tokenizer"):
        llm.generate(["hello"], GREEDY)
    with pytest.raises(BadRequestError, match="stop strings need a tokenizer"):
        llm.generate([[1, 2]], SamplingParams(stop=["x"]))
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == MAX_NEW


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("scheduler.token_budgt=3", "token_budgt"),
        ("scheduler.token_budget=abc", "token_budget"),
        ("scheduler.token_budget=-1", "token_budget must be >= 1, 0 to measure one, or null"),
        ("scheduler.budget_candidates=[]", "budget_candidates"),
        ("kv_allocator.blok_size=3", "blok_size"),
        ("model.dtype=float8", "model.dtype"),
        ("engine.devise=cpu", "devise"),
    ],
)
def test_bad_config_values_are_named(override, match):
    with pytest.raises(Exception, match=match):
        LLM("mistral", overrides=[*TINY_PRESET, "+scheduler=splitfuse", override])


def test_unknown_scheduler_lists_the_options():
    with pytest.raises(Exception, match=r"(?s)nope.*continuous.*splitfuse.*static"):
        LLM("mistral", overrides=[*TINY_PRESET, "+scheduler=nope"])


def test_checkpoint_problems_are_named(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        LLM("mistral", checkpoint="/no/such/dir")
    with pytest.raises(ValueError, match="model_type"):
        LLM("llama", checkpoint=str(checkpoints["mistral"]))
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["mistral"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadError) as err:
        LLM("mistral", checkpoint=str(broken))
    assert "missing weights: model.layers.1.self_attn.k_proj.weight" in str(err.value)
    assert "unexpected weights: model.layers.0.mlp.extra.weight" in str(err.value)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop": [7]}, "stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_out_of_range_and_wrong_type_parameters_are_named(params, field):
    with pytest.raises(BadRequestError, match=field) as err:
        SamplingParams(**params)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("prompt", "params", "field", "match"),
    [
        ([5, 6], {"stop_token_ids": [999999], "min_tokens": 1}, "stop_token_ids", r"\[0, 96\)"),
        ([5, 6], {"stop_token_ids": [-1], "min_tokens": 1}, "stop_token_ids", r"\[-1\]"),
        ([5] * 6, {"max_tokens": 10**9}, "max_tokens", "leave room for 250"),
        ([5] * 6, {"max_tokens": 251}, "max_tokens", "context of 256 tokens"),
        ([5] * 6, {"max_tokens": 300, "min_tokens": 251}, "min_tokens", "leave room"),
        ("w3 " * 1000, {}, "prompt", "characters"),
    ],
)
def test_limits_of_the_model_are_checked_at_the_boundary(llm, prompt, params, field, match):
    with pytest.raises(BadRequestError, match=match) as err:
        llm.engine.add_request(prompt, SamplingParams(**params))
    assert err.value.field == field
    with pytest.raises(BadRequestError, match=match):
        llm.engine.check_request(prompt, SamplingParams(**params))
    assert not llm.engine.has_unfinished()


def test_values_that_once_crashed_the_sampler_now_run(llm, prompts):
    """Each of these stopped the engine loop for good (torch's generator seeding, a tensor of
    top-k values, a huge temperature); now they generate, alongside a greedy request."""
    cases = [
        SamplingParams(max_tokens=4, seed=2**63 - 1, ignore_eos=True),
        SamplingParams(max_tokens=4, top_k=2**63, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1e300, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1e-300, ignore_eos=True),  # greedy
        SamplingParams(max_tokens=4, top_p=1e-300, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=4, min_tokens=4, stop_token_ids=[95, 0], ignore_eos=True),
    ]
    outs = llm.generate([prompts[2]] * len(cases) + [prompts[3]], [*cases, GREEDY])
    assert all(len(o.token_ids) == 4 for o in outs[:-1])
    assert outs[3].token_ids == llm.generate([prompts[2]], GREEDY)[0].token_ids[:4]
    assert not {0, 95} & set(outs[-2].token_ids)
    assert len(outs[-1].token_ids) == MAX_NEW and llm.engine.is_healthy


def test_cap_max_tokens_caps_instead_of_refusing(checkpoints):
    llm = LLM(
        "mistral",
        checkpoint=str(checkpoints["mistral"]),
        overrides=["+scheduler=splitfuse", "engine.cap_max_tokens=true"],
    )
    out = llm.generate([[5] * 250], SamplingParams(max_tokens=10**9, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (6, "length")
    with pytest.raises(BadRequestError, match="min_tokens"):  # min_tokens is never capped
        llm.generate([[5] * 250], SamplingParams(max_tokens=10**9, min_tokens=7))
