"""A Mixtral-shaped MoE layer (8 experts, top-2, expert width 3.5 x hidden) on the CPU:
modgen's ``topk`` block against transformers' MixtralSparseMoeBlock, the same weights and
batch, at a SplitFuse step's 512 tokens and a decode batch's 32 (float32)."""

from __future__ import annotations

import pytest
import torch
from moe_pair import STEP, moe_pair

HIDDEN, INTER = 1024, 3584  # Mixtral-8x7B's 4096 / 14336, scaled by 1/4


@pytest.fixture(scope="module")
def pair():
    return moe_pair("mixtral", HIDDEN, INTER, 8, 2)


@pytest.mark.parametrize("tokens", [32, 512])
@pytest.mark.parametrize("impl", ["modgen", "transformers"])
def test_mixtral_moe_layer(benchmark, pair, impl, tokens):
    hf, ours = pair
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    benchmark.group = f"mixtral moe, {tokens} tokens"
    with torch.inference_mode():
        run = (lambda: ours(x, STEP)) if impl == "modgen" else (lambda: hf(x[None]))
        out = benchmark(run)
        want = hf(x[None])[0]
    torch.testing.assert_close(out.reshape(want.shape), want, rtol=1e-4, atol=1e-3)
