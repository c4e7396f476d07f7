"""``model=mixtral``: Mixtral (Llama's attention; every MLP a mixture of experts, top-k routing
with the top k's weights renormalised; Mistral's sliding window when the config sets one)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.plugins.models.llama import LlamaShape, llama_arch, llama_rules
from modgen.registry import register
from modgen.weights import WeightRule

MOE = "model.layers.{i}.block_sparse_moe"
WEIGHTS = (
    *llama_rules(mlp=False),
    WeightRule(f"{MOE}.gate.weight", "layers.{i}.mlp.router.weight"),
    WeightRule(
        f"{MOE}.experts.{{e}}.w1.weight", "layers.{i}.mlp.experts_gate_up", "gate", "expert"
    ),
    WeightRule(f"{MOE}.experts.{{e}}.w3.weight", "layers.{i}.mlp.experts_gate_up", "up", "expert"),
    WeightRule(f"{MOE}.experts.{{e}}.w2.weight", "layers.{i}.mlp.experts_down", tp="expert"),
)


@register("model", "mixtral")
class MixtralForCausalLM(DecoderLM):
    """Mixtral decoder; loads Hugging Face ``mixtral`` checkpoints."""

    hf_model_types = ("mixtral",)
    weight_rules = WEIGHTS

    @dataclass(kw_only=True)
    class Config(LlamaShape):
        """Mixtral settings; the shape fields apply when no checkpoint is given."""

        intermediate_size: int = 14336
        """Width of one expert's MLP."""
        num_key_value_heads: int | None = 8
        """KV heads."""
        max_position_embeddings: int = 131072
        """Longest context."""
        rope_theta: float = 1e6
        """RoPE base."""
        rms_norm_eps: float = 1e-5
        """RMSNorm epsilon."""
        num_local_experts: int = 8
        """Experts per layer."""
        num_experts_per_tok: int = 2
        """Experts each token is routed to."""

    @classmethod
    def arch(cls, s: Config) -> DecoderArch:
        n, window = s.num_hidden_layers, s.sliding_window
        moe = block(
            "moe", "topk", num_experts=s.num_local_experts, top_k=s.num_experts_per_tok,
            intermediate=s.intermediate_size, renormalize=True, act=s.hidden_act,
        )  # fmt: skip
        arch = llama_arch(s, windows=(window,) * n if window else None)
        return replace(
            arch, mlp=moe, num_experts=s.num_local_experts, experts_per_token=s.num_experts_per_tok
        )
