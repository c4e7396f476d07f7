"""Every model family against transformers on the same tiny random checkpoints: greedy tokens
equal for every scheduler (a token budget under the shortest prompt, an odd block size) and on
each CPU path, last-prompt-token logits within 1e-4; model=auto picks each family."""

from __future__ import annotations

import pytest
import torch
from checkpoints import FAMILIES
from conftest import FAMILY_MAX_NEW
from test_e2e_hf import capture_first_logits

from modgen import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=FAMILY_MAX_NEW, temperature=0.0, ignore_eos=True)
KINDS = list(FAMILIES)
SCHEDULES = {
    "splitfuse7": ["+scheduler=splitfuse", "scheduler.token_budget=7"],
    "continuous": ["+scheduler=continuous"],
    "static": ["+scheduler=static", "scheduler.max_num_seqs=3"],
}
PATHS = {  # every C++ kernel and oneDNN's GEMM, or plain torch throughout
    "kernels": ["attention=cpu", "model.cpu_kernels=true", "model.cpu_linear=onednn"],
    "plain": ["attention=torch", "model.cpu_kernels=false", "model.cpu_linear=blas"],
}


def run(zoo, kind: str, overrides: list[str], model: str | None = None) -> LLM:
    """Generate ``zoo``'s prompts with ``kind``'s checkpoint and check them against
    transformers; returns the LLM."""
    llm = LLM(model or zoo.model(kind), checkpoint=str(zoo.path(kind)), overrides=overrides)
    logits = capture_first_logits(llm)
    outs = llm.generate(zoo.prompts, GREEDY)
    for i, (out, (ref_tokens, ref_logits)) in enumerate(
        zip(outs, zoo.reference(kind), strict=True)
    ):
        assert out.token_ids == ref_tokens, f"prompt {i} (len {len(zoo.prompts[i])}) diverged"
        torch.testing.assert_close(logits[out.request_id], ref_logits, rtol=1e-4, atol=1e-4)
    return llm


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", KINDS)
def test_family_matches_transformers(kind, schedule, zoo):
    run(zoo, kind, [*SCHEDULES[schedule], "kv_allocator.block_size=5"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_family_on_each_cpu_path(kind, path, zoo):
    llm = run(zoo, kind, ["+scheduler=splitfuse", "scheduler.token_budget=16", *PATHS[path],
                          "kv_allocator.block_size=3"])  # fmt: skip
    assert llm.engine.executor.attn.registry_name == PATHS[path][0].split("=")[1]


@pytest.mark.parametrize("kind", KINDS)
def test_auto_picks_the_family(kind, zoo, caplog):
    llm = run(zoo, kind, ["+scheduler=splitfuse"], model="auto")
    assert llm.engine.executor.model.registry_name == zoo.model(kind)
    assert llm.engine.spec.family == zoo.model(kind)
