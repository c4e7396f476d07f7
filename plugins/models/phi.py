"""``model=phi``: Phi-1.5 / Phi-2 (attention and MLP in parallel on one LayerNorm's output,
partial rotary, biases everywhere including the LM head, a GELU MLP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.model import ModelConfig
from modgen.registry import register
from modgen.weights import WeightRule

LAYER, OUT = "model.layers.{i}", "layers.{i}"
WEIGHTS = [
    WeightRule("model.embed_tokens.weight", "embed.weight", tp="vocab"),
    WeightRule("lm_head.weight", "lm_head.weight", tp="vocab"),
    WeightRule("lm_head.bias", "lm_head.bias", tp="vocab"),
]
for _kind in ("weight", "bias"):
    WEIGHTS += [
        WeightRule(f"model.final_layernorm.{_kind}", f"norm.{_kind}"),
        WeightRule(f"{LAYER}.input_layernorm.{_kind}", f"{OUT}.attn_norm.{_kind}"),
        *[WeightRule(f"{LAYER}.self_attn.{s}_proj.{_kind}", f"{OUT}.attn.qkv.{_kind}", s, "column")
          for s in "qkv"],
        WeightRule(f"{LAYER}.self_attn.q_layernorm.{_kind}", f"{OUT}.attn.q_norm.{_kind}"),
        WeightRule(f"{LAYER}.self_attn.k_layernorm.{_kind}", f"{OUT}.attn.k_norm.{_kind}"),
        WeightRule(f"{LAYER}.mlp.fc1.{_kind}", f"{OUT}.mlp.up.{_kind}", tp="column"),
    ]  # fmt: skip
WEIGHTS += [
    WeightRule(f"{LAYER}.self_attn.dense.weight", f"{OUT}.attn.o_proj.weight", tp="row"),
    WeightRule(f"{LAYER}.self_attn.dense.bias", f"{OUT}.attn.o_proj.bias"),
    WeightRule(f"{LAYER}.mlp.fc2.weight", f"{OUT}.mlp.down.weight", tp="row"),
    WeightRule(f"{LAYER}.mlp.fc2.bias", f"{OUT}.mlp.down.bias"),
]


@dataclass(kw_only=True)
class PhiShape(ModelConfig):
    """Phi config fields (Hugging Face names and defaults)."""

    vocab_size: int = 51200
    """Vocabulary size."""
    hidden_size: int = 2048
    """Model width."""
    intermediate_size: int = 8192
    """MLP width."""
    num_hidden_layers: int = 24
    """Decoder layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int | None = None
    """KV heads; None: as many as query heads."""
    max_position_embeddings: int = 2048
    """Longest context."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling, as in Hugging Face."""
    partial_rotary_factor: float = 0.5
    """Share of each head's dims RoPE rotates."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    hidden_act: str = "gelu_new"
    """MLP activation."""
    qk_layernorm: bool = False
    """A LayerNorm over each query and key head."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    eos_token_id: int | None = 2
    """End-of-sequence token id (config.json may give a list)."""


@register("model", "phi")
class PhiForCausalLM(DecoderLM):
    """Phi-2 decoder; loads Hugging Face ``phi`` checkpoints."""

    hf_model_types = ("phi",)
    weight_rules = tuple(WEIGHTS)

    @dataclass(kw_only=True)
    class Config(PhiShape):
        """Phi settings; the shape fields apply when no checkpoint is given."""

    @classmethod
    def arch(cls, s: PhiShape) -> DecoderArch:
        heads, head_dim = s.num_attention_heads, s.hidden_size // s.num_attention_heads
        norm = block("norm", "layer", eps=s.layer_norm_eps)
        return DecoderArch(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_hidden_layers,
            num_heads=heads, num_kv_heads=s.num_key_value_heads or heads, head_dim=head_dim,
            intermediate_size=s.intermediate_size,
            max_position_embeddings=s.max_position_embeddings,
            tie_word_embeddings=s.tie_word_embeddings, norm=norm,
            position=block("position", "rope", theta=s.rope_theta, scaling=s.rope_scaling,
                           rotary_dim=int(head_dim * s.partial_rotary_factor)),
            attention=block("attention", "qkv", bias=True, out_bias=True,
                            qk_norm=norm if s.qk_layernorm else None),
            mlp=block("mlp", "plain", intermediate=s.intermediate_size, act=s.hidden_act),
            layer=block("layer", "parallel", norms=1), lm_head_bias=True, gated_mlp=False,
        )  # fmt: skip
