"""Shared fixtures: tiny random checkpoints (made once per session) and their HF outputs."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Triton kernels are made when their module is first imported: the tests run them under Triton's
# CPU interpreter unless the environment already says otherwise (TRITON_INTERPRET=0 on a GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoints import hf_greedy, hf_model, make_checkpoint

MAX_NEW = 10
PROMPT_LENS = (1, 3, 9, 17, 30, 41, 50, 64)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def checkpoints(ckpt_dir) -> dict[str, Path]:
    """Tiny llama (Llama-3 rope scaling) and mistral (sliding window 8) checkpoints."""
    return {kind: make_checkpoint(ckpt_dir / kind, kind) for kind in ("llama", "mistral")}


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Eight prompts of different lengths (token ids 3.. so none is a special token)."""
    rng = random.Random(1234)
    return [[rng.randrange(3, 96) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="session")
def hf_reference(checkpoints, prompts) -> dict[str, list[tuple[list[int], object]]]:
    """Per model: HF greedy continuations of ``prompts`` and last-prompt-token logits."""
    out = {}
    for kind, path in checkpoints.items():
        model = hf_model(path)
        out[kind] = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    return out
