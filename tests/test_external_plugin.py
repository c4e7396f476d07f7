"""Real pip-installed packages register a scheduler and a model family through the
``modgen.plugins`` entry point: the CLI and the Python API use the scheduler, and the family,
made of modgen's registered blocks only, matches transformers as the built-in ones do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PLUGINS = HERE / "plugins"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(PLUGINS / "modgen_fifo_plugin"),
         str(PLUGINS / "modgen_starcoder2_plugin")],
        check=True, capture_output=True,
    )  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    return env


def test_python_api_uses_the_installed_plugin(plugin_env, checkpoints, prompts, hf_reference):
    code = f"""
import json
from modgen import LLM, SamplingParams
llm = LLM("llama", checkpoint={str(checkpoints["llama"])!r},
          overrides=["+scheduler=fifo_one", "scheduler.chunk=5"])
outs = llm.generate({prompts!r}, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
print(json.dumps([type(llm.engine.scheduler).__module__, [o.token_ids for o in outs]]))
"""
    res = subprocess.run(
        [sys.executable, "-c", code], env=plugin_env, capture_output=True, text=True, check=True
    )
    module, tokens = json.loads(res.stdout.strip().splitlines()[-1])
    assert module == "modgen_fifo"
    assert tokens == [ref for ref, _ in hf_reference["llama"]]


def test_cli_uses_the_installed_plugin(plugin_env, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "modgen", "+scheduler=fifo_one", "model=mistral",
         "model.num_hidden_layers=1", "workload.num_requests=3", "workload.prompt_len=[4,12]",
         "workload.output_len=[2,4]", f"hydra.run.dir={tmp_path}"],
        env=plugin_env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "generate: mistral / fifo_one" in res.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["summary"]["requests"] == 3
    assert results["config"]["scheduler"]["name"] == "fifo_one"


def test_a_family_made_of_blocks_matches_transformers(plugin_env, tmp_path, family_prompts):
    """The README's "adding a model" guide, followed: StarCoder2 registered from outside, from
    blocks only; greedy tokens equal to transformers' and last-prompt-token logits within 1e-4,
    by name and through model=auto."""
    import torch
    import transformers
    from checkpoints import COMMON, hf_greedy, hf_model, save_tokenizer

    config = transformers.Starcoder2Config(**{**COMMON, "sliding_window": 8, "use_bias": True})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    refs = [hf_greedy(hf_model(tmp_path), p, 6) for p in family_prompts]
    code = f"""
import json
from modgen import LLM, SamplingParams
from test_e2e_hf import capture_first_logits
out = {{}}
for model in ("starcoder2", "auto"):
    llm = LLM(model, checkpoint={str(tmp_path)!r},
              overrides=["+scheduler=splitfuse", "scheduler.token_budget=7",
                         "kv_allocator.block_size=5"])
    logits = capture_first_logits(llm)
    outs = llm.generate({family_prompts!r},
                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    out[model] = [llm.engine.executor.model.registry_name,
                  [[o.token_ids, logits[o.request_id].tolist()] for o in outs]]
print(json.dumps(out))
"""
    env = {**plugin_env, "PYTHONPATH": os.pathsep.join([plugin_env["PYTHONPATH"], str(HERE)])}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    for name, rows in json.loads(res.stdout.strip().splitlines()[-1]).values():
        assert name == "starcoder2"
        for (tokens, logits), (ref_tokens, ref_logits) in zip(rows, refs, strict=True):
            assert tokens == ref_tokens
            torch.testing.assert_close(torch.tensor(logits), ref_logits, rtol=1e-4, atol=1e-4)
