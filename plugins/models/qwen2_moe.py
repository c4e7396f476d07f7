"""``model=qwen2_moe``: Qwen2-MoE (Qwen2's attention; MoE layers every ``decoder_sparse_step``
except ``mlp_only_layers``, top-k routing without renormalising unless ``norm_topk_prob``, plus
a shared expert scaled by a sigmoid gate)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.blocks.hf import layer_windows
from modgen.plugins.models.llama import gated_mlp_rules, llama_arch, llama_rules
from modgen.plugins.models.qwen2 import QwenShape
from modgen.registry import register
from modgen.weights import WeightRule

MLP, OUT = "model.layers.{i}.mlp", "layers.{i}.mlp"
WEIGHTS = (
    *llama_rules(),  # the dense MLP of mlp-only layers
    WeightRule(f"{MLP}.gate.weight", f"{OUT}.router.weight"),
    WeightRule(f"{MLP}.experts.{{e}}.gate_proj.weight", f"{OUT}.experts_gate_up", "gate", "expert"),
    WeightRule(f"{MLP}.experts.{{e}}.up_proj.weight", f"{OUT}.experts_gate_up", "up", "expert"),
    WeightRule(f"{MLP}.experts.{{e}}.down_proj.weight", f"{OUT}.experts_down", tp="expert"),
    *gated_mlp_rules(f"{MLP}.shared_expert", f"{OUT}.shared"),
    WeightRule(f"{MLP}.shared_expert_gate.weight", f"{OUT}.shared_gate.weight"),
)


@register("model", "qwen2_moe")
class Qwen2MoeForCausalLM(DecoderLM):
    """Qwen2-MoE decoder; loads Hugging Face ``qwen2_moe`` checkpoints."""

    hf_model_types = ("qwen2_moe",)
    weight_rules = WEIGHTS

    @dataclass(kw_only=True)
    class Config(QwenShape):
        """Qwen2-MoE settings; the shape fields apply when no checkpoint is given."""

        hidden_size: int = 2048
        """Model width."""
        intermediate_size: int = 5632
        """Width of the dense MLP of non-MoE layers."""
        num_hidden_layers: int = 24
        """Decoder layers."""
        num_attention_heads: int = 16
        """Query heads."""
        num_key_value_heads: int | None = 16
        """KV heads."""
        num_experts: int = 60
        """Experts per MoE layer."""
        num_experts_per_tok: int = 4
        """Experts each token is routed to."""
        moe_intermediate_size: int = 1408
        """Width of one expert's MLP."""
        shared_expert_intermediate_size: int = 5632
        """Width of the shared expert's MLP."""
        decoder_sparse_step: int = 1
        """Every this many layers is an MoE layer."""
        mlp_only_layers: list[int] | None = None
        """Layers with a dense MLP whatever the step."""
        norm_topk_prob: bool = False
        """Renormalise the top k's routing weights to sum to one."""
        qkv_bias: bool = True
        """Biases on the q/k/v projections."""

    @classmethod
    def arch(cls, s: Config) -> DecoderArch:
        n = s.num_hidden_layers
        dense = block("mlp", "gated", intermediate=s.intermediate_size, act=s.hidden_act)
        moe = block(
            "moe", "topk", num_experts=s.num_experts, top_k=s.num_experts_per_tok,
            intermediate=s.moe_intermediate_size, renormalize=s.norm_topk_prob,
            act=s.hidden_act, shared_intermediate=s.shared_expert_intermediate_size,
        )  # fmt: skip
        mlps = tuple(
            moe if i not in (s.mlp_only_layers or []) and s.num_experts > 0
            and (i + 1) % s.decoder_sparse_step == 0 else dense
            for i in range(n)
        )  # fmt: skip
        window = s.sliding_window if s.use_sliding_window else None
        pattern = [bool((i + 1) % 2) and i < s.max_window_layers for i in range(n)]
        qkv = block("attention", "qkv", bias=s.qkv_bias, out_bias=False)
        return replace(
            llama_arch(s, layer_windows(n, window, s.layer_types, pattern)), attention=qkv,
            mlp=mlps, intermediate_size=s.moe_intermediate_size, num_experts=s.num_experts,
            experts_per_token=s.num_experts_per_tok,
        )  # fmt: skip
