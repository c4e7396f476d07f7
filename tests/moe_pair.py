"""A transformers MoE layer and modgen's ``topk`` MoE block holding the same weights."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from modgen.blocks import block, build_block
from modgen.blocks.ops import TorchOps
from modgen.engine.parallel import SINGLE

STEP = SimpleNamespace(ops=TorchOps(), parallel=SINGLE)
"""What the block reads of a step: the element-wise ops, the (single) rank."""


@torch.no_grad()
def moe_pair(kind: str, hidden: int, inter: int, experts: int, top_k: int, shared: int = 0):
    """(transformers' sparse MoE block, modgen's block) of ``kind`` (mixtral or qwen2_moe) with
    the same random weights, in eval mode."""
    import transformers

    torch.manual_seed(0)
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
            num_experts_per_tok=top_k,
        )  # fmt: skip
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    else:
        config = transformers.Qwen2MoeConfig(
            hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
            num_experts_per_tok=top_k, shared_expert_intermediate_size=shared,
            norm_topk_prob=False,
        )  # fmt: skip
        from transformers.models.qwen2_moe.modeling_qwen2_moe import (
            Qwen2MoeSparseMoeBlock as Block,
        )
    hf = Block(config).eval()
    for p in hf.parameters():
        p.normal_(0.0, 0.1)
    spec = block(
        "moe", "topk", num_experts=experts, top_k=top_k, intermediate=inter,
        renormalize=kind == "mixtral", shared_intermediate=shared or None,
    )  # fmt: skip
    ours = build_block(spec, SimpleNamespace(hidden_size=hidden)).eval()
    ours.router.weight.copy_(hf.gate.weight)
    ours.experts_gate_up.copy_(hf.experts.gate_up_proj)
    ours.experts_down.copy_(hf.experts.down_proj)
    if shared:
        mlp = hf.shared_expert
        ours.shared.gate_up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        ours.shared.down.weight.copy_(mlp.down_proj.weight)
        ours.shared_gate.weight.copy_(hf.shared_expert_gate.weight)
    return hf, ours
