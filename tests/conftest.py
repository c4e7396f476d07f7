"""Shared fixtures: tiny random checkpoints (made once per session) and their HF outputs; a
machine load the tests set."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))
# Triton kernels are made when their module is first imported: the tests run them under Triton's
# CPU interpreter unless the environment already says otherwise (TRITON_INTERPRET=0 on a GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoints import FAMILY_OF, hf_greedy, hf_model, make_checkpoint

# Property tests draw new examples each run, which finds cases (a developer's runs keep doing
# so); CI (.ci/run sets CI) draws the same ones every time, so that its verdict is the code's.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

MAX_NEW = 10
PROMPT_LENS = (1, 3, 9, 17, 30, 41, 50, 64)
FAMILY_MAX_NEW = 6
FAMILY_PROMPT_LENS = (9, 12, 17, 26, 33)
"""Prompts of the family tests: all longer than a token budget of 7 and a window of 8."""


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


class Zoo:
    """Tiny checkpoints of every family (tests/checkpoints.py FAMILIES), each made on first use,
    with the transformers greedy continuations and last-prompt-token logits of
    ``family_prompts``."""

    def __init__(self, root: Path, prompts: list[list[int]]) -> None:
        self.root, self.prompts = root, prompts
        self._paths: dict[str, Path] = {}
        self._refs: dict[str, list] = {}

    def path(self, kind: str) -> Path:
        """The checkpoint directory of ``kind``."""
        if kind not in self._paths:
            self._paths[kind] = make_checkpoint(self.root / kind, kind)
        return self._paths[kind]

    def model(self, kind: str) -> str:
        """The modgen model name ``kind`` loads as."""
        return FAMILY_OF.get(kind, kind)

    def reference(self, kind: str) -> list:
        """Per prompt: (transformers' greedy tokens, its last-prompt-token logits)."""
        if kind not in self._refs:
            model = hf_model(self.path(kind))
            self._refs[kind] = [hf_greedy(model, p, FAMILY_MAX_NEW) for p in self.prompts]
        return self._refs[kind]


@pytest.fixture(scope="session")
def family_prompts() -> list[list[int]]:
    rng = random.Random(4321)
    return [[rng.randrange(3, 96) for _ in range(n)] for n in FAMILY_PROMPT_LENS]


@pytest.fixture(scope="session")
def zoo(ckpt_dir, family_prompts) -> Zoo:
    return Zoo(ckpt_dir / "zoo", family_prompts)


@pytest.fixture
def other_load(monkeypatch):
    """Every ``modgen.machine.OtherLoad`` reports the share of the CPUs other processes kept
    busy that the test sets (``other_load.fraction = 0.6``; idle until then)."""
    from modgen import machine

    class Fixed(machine.OtherLoad):
        fraction = 0.0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(machine, "OtherLoad", Fixed)
    return Fixed
