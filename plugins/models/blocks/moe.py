"""The ``topk`` mixture-of-experts block: a router picks each token's top-k experts (softmax over
all experts, the top k's weights renormalised or not), tokens run grouped by expert (a gather,
one matmul per active expert, a scatter-add), and an optional shared expert, scaled by a
sigmoid gate, is added (Qwen2-MoE)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modgen.blocks import FeedForward, register_block, tp_part, tp_place
from modgen.plugins.models.blocks.mlp import GatedMLP, check_activation, gated_act


@register_block("moe", "topk")
class TopKMoE(FeedForward):
    """Experts are gated MLPs whose weights are stacked: ``experts_gate_up`` [E, 2I, hidden]
    (gate rows first) and ``experts_down`` [E, hidden, I]. Over tensor-parallel ranks each
    holds whole experts (E / ranks of them; the router is replicated) and its shard of the
    shared expert; their partial outputs are summed in one all-reduce."""

    tensor_parallel = True

    def __init__(
        self,
        arch: Any,
        *,
        num_experts: int,
        top_k: int,
        intermediate: int,
        renormalize: bool = True,
        act: str = "silu",
        shared_intermediate: int | None = None,
    ) -> None:
        super().__init__()
        hidden = arch.hidden_size
        self.num_experts, self.top_k, self.act, self.renormalize = (
            num_experts, top_k, act, renormalize,
        )  # fmt: skip
        self.router = nn.Linear(hidden, num_experts, bias=False)
        local = tp_part(arch, num_experts, "experts")
        self.first_expert = tp_place(arch)[0] * local
        self.experts_gate_up = nn.Parameter(torch.empty(local, 2 * intermediate, hidden))
        self.experts_down = nn.Parameter(torch.empty(local, hidden, intermediate))
        self.shared = self.shared_gate = None
        if shared_intermediate:
            self.shared = GatedMLP(arch, intermediate=shared_intermediate, act=act, reduce=False)
            self.shared_gate = nn.Linear(hidden, 1, bias=False)

    @classmethod
    def check(cls, *, num_experts: int, top_k: int, act: str = "silu", **_: Any) -> None:
        check_activation(act)
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}] experts, got {top_k}")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts [T, k] and their weights [T, k] (in x's dtype)."""
        probs = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)

    def forward(self, x, step):
        experts, weights = self.route(x)
        flat = experts.flatten()  # [T * k]: pair p is token p // k
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens, pair_weights = order // self.top_k, weights.flatten()[order]
        out = torch.zeros_like(x)
        first, local = self.first_expert, self.experts_down.shape[0]
        start = sum(counts[:first])
        for e, n in enumerate(counts[first : first + local]):
            if n == 0:
                continue
            rows = tokens[start : start + n]
            h = gated_act(F.linear(x[rows], self.experts_gate_up[e]), self.act, step.ops)
            y = F.linear(h, self.experts_down[e]) * pair_weights[start : start + n, None]
            out.index_add_(0, rows, y)
            start += n
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x, step)
        return step.parallel.all_reduce(out)
