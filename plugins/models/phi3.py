"""``model=phi3``: Phi-3 (Llama's layout with q/k/v and gate/up fused in the checkpoint, RoPE
with longrope scaling for the 128k models, partial rotary for Phi-4-mini, and a sliding window
on every layer when the config sets one)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.plugins.models.llama import LlamaShape, llama_arch
from modgen.registry import register
from modgen.weights import WeightRule

LAYER, OUT = "model.layers.{i}", "layers.{i}"
WEIGHTS = (
    WeightRule("model.embed_tokens.weight", "embed.weight", tp="vocab"),
    WeightRule("model.norm.weight", "norm.weight"),
    WeightRule("lm_head.weight", "lm_head.weight", tp="vocab"),
    WeightRule(f"{LAYER}.input_layernorm.weight", f"{OUT}.attn_norm.weight"),
    WeightRule(f"{LAYER}.post_attention_layernorm.weight", f"{OUT}.mlp_norm.weight"),
    WeightRule(f"{LAYER}.self_attn.qkv_proj.weight", f"{OUT}.attn.qkv.weight", tp="column"),
    WeightRule(f"{LAYER}.self_attn.o_proj.weight", f"{OUT}.attn.o_proj.weight", tp="row"),
    WeightRule(f"{LAYER}.mlp.gate_up_proj.weight", f"{OUT}.mlp.gate_up.weight", tp="column"),
    WeightRule(f"{LAYER}.mlp.down_proj.weight", f"{OUT}.mlp.down.weight", tp="row"),
)
"""q/k/v and gate/up come packed, in modgen's order (a column split must cut each part)."""


@register("model", "phi3")
class Phi3ForCausalLM(DecoderLM):
    """Phi-3 decoder; loads Hugging Face ``phi3`` checkpoints."""

    hf_model_types = ("phi3",)
    weight_rules = WEIGHTS

    @dataclass(kw_only=True)
    class Config(LlamaShape):
        """Phi-3 settings; the shape fields apply when no checkpoint is given."""

        vocab_size: int = 32064
        """Vocabulary size."""
        hidden_size: int = 3072
        """Model width."""
        intermediate_size: int = 8192
        """MLP width."""
        max_position_embeddings: int = 4096
        """Longest context (the scaled one for longrope models)."""
        original_max_position_embeddings: int = 4096
        """The context the model was pre-trained at (longrope serves up to it)."""
        partial_rotary_factor: float = 1.0
        """Share of each head's dims RoPE rotates."""
        rms_norm_eps: float = 1e-5
        """RMSNorm epsilon."""
        eos_token_id: int | None = 32000
        """End-of-sequence token id (config.json may give a list)."""

    @classmethod
    def arch(cls, s: Config) -> DecoderArch:
        arch = llama_arch(s)
        scaling = dict(s.rope_scaling) if s.rope_scaling else None
        if scaling and scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
            scaling["rope_type"] = "longrope"  # Phi-3's old names, as transformers reads them
        if scaling and scaling.get("rope_type") == "longrope":
            scaling.setdefault(
                "original_max_position_embeddings", s.original_max_position_embeddings
            )
        rope = block(
            "position", "rope", theta=s.rope_theta, scaling=scaling,
            rotary_dim=int(arch.head_dim * s.partial_rotary_factor),
            max_position_embeddings=s.max_position_embeddings,
        )  # fmt: skip
        window = s.sliding_window
        return replace(arch, position=rope, windows=(window,) * arch.num_layers if window else None)
