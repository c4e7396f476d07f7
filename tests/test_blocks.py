"""The block registries: registering checks the interface and duplicate names, a failed lookup
lists what exists, and a block spec is checked when a family makes it."""

from __future__ import annotations

import pytest
import torch

from modgen.blocks import BlockError, Norm, block, block_names, build_block, register_block


@register_block("norm", "test_scale")
class ScaleNorm(Norm):
    """Multiplies by a constant (a test block)."""

    def __init__(self, dim: int, *, factor: float = 2.0) -> None:
        super().__init__()
        self.dim, self.factor = dim, factor

    @classmethod
    def check(cls, *, factor: float = 2.0) -> None:
        if factor <= 0:
            raise ValueError(f"test_scale: factor must be positive, got {factor}")

    def forward(self, x, ops, residual=None):
        h = x if residual is None else x + residual
        return h * self.factor, h


def test_a_registered_block_is_found_and_built_from_its_spec():
    assert "test_scale" in block_names("norm")
    spec = block("norm", "test_scale", factor=3.0)
    norm = build_block(spec, 8)
    assert isinstance(norm, ScaleNorm) and norm.dim == 8
    out, h = norm(torch.ones(2, 8), None, residual=torch.ones(2, 8))
    assert torch.equal(out, torch.full((2, 8), 6.0)) and torch.equal(h, torch.full((2, 8), 2.0))


def test_specs_refuse_unknown_blocks_settings_and_values():
    with pytest.raises(BlockError, match=r"no norm block named 'nope'; registered: .*test_scale"):
        block("norm", "nope")
    with pytest.raises(ValueError, match=r"norm block 'test_scale' has no setting \['eps'\]"):
        block("norm", "test_scale", eps=1e-5)
    with pytest.raises(ValueError, match="factor must be positive, got -1"):
        block("norm", "test_scale", factor=-1)
    with pytest.raises(BlockError, match="unknown block kind 'normal'"):
        block("normal", "test_scale")


def test_registering_checks_the_interface_and_duplicates():
    with pytest.raises(BlockError, match="must subclass Norm"):
        register_block("norm", "not_a_norm")(torch.nn.Linear)
    with pytest.raises(BlockError, match="already registered by"):

        @register_block("norm", "test_scale")
        class Other(ScaleNorm):
            pass


@pytest.mark.parametrize("tokens", [1, 3, 37])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_block_matches_transformers(kind, tokens):
    """Grouped by expert (gather, one matmul per active expert, scatter-add), with more experts
    than tokens (1 and 3 tokens over 8 experts) and fewer; Qwen2-MoE's shared expert too."""
    from moe_pair import STEP, moe_pair

    hf, ours = moe_pair(kind, 32, 48, 8, 2, shared=40 if kind == "qwen2_moe" else 0)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        want = hf(x[None])[0]
        got = ours(x, STEP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
