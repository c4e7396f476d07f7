"""The linear layouts' GEMMs at a decode step's and a prompt chunk's row counts, on the peers'
model shapes, with the weights out of cache as they are in a model: each call takes the next of
eight copies (other layers' weights run between two uses of one). GFLOP/s in extra_info.

python -m pytest benchmarks/test_linear.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modgen.blocks.ops import OpsUnavailable, linear_layouts, with_layout

COPIES = 8
SHAPES = {  # in, out: the peers' Mistral (hidden 512, MLP 1536, vocab 32000)
    "qkv": (512, 768),
    "gate_up": (512, 3072),
    "down": (1536, 512),
    "lm_head": (512, 32000),
}


@pytest.mark.parametrize("rows", [16, 64, 512])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", linear_layouts())
@torch.inference_mode()
def test_linear_layout(benchmark, layout, shape, rows):
    if shape == "lm_head" and rows != 16:
        pytest.skip("the LM head runs the sampled rows only")
    n_in, n_out = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    modules = []
    for _ in range(COPIES):
        linear = nn.Linear(n_in, n_out, bias=False)
        linear.weight.data = torch.randn(n_out, n_in, generator=gen) * 0.02
        try:
            modules.append(with_layout(linear, layout))
        except OpsUnavailable as err:
            pytest.skip(f"{layout} does not run here: {err}")
    x = torch.randn(rows, n_in, generator=gen)
    turn = iter(range(10**9))

    def call():
        return modules[next(turn) % COPIES](x)

    out = benchmark(call)
    assert out.shape == (rows, n_out)
    benchmark.extra_info["gflops"] = 2 * rows * n_in * n_out / benchmark.stats["median"] / 1e9
