"""A real pip-installed package registers a scheduler through the ``modgen.plugins`` entry
point, and both the CLI and the Python API use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).parent / "plugins" / "modgen_fifo_plugin"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(PLUGIN)],
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
