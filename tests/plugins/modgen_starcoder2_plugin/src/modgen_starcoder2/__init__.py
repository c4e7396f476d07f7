"""``model=starcoder2``: a model family added from outside modgen, from its registered blocks only
(the README's "adding a model" guide, step by step).

StarCoder2 is pre-norm LayerNorm layers with biases, RoPE attention with grouped KV heads and an
optional sliding window, and a plain GELU-tanh MLP: every part is a block modgen already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.model import ModelConfig
from modgen.registry import register
from modgen.weights import WeightRule

# 1. The weight map: Hugging Face names -> modgen parameters, and how each splits for tensor
#    parallelism. q/k/v pack into one projection ("q", "k", "v" shards).
LAYER, OUT = "model.layers.{i}", "layers.{i}"
WEIGHTS = [
    WeightRule("model.embed_tokens.weight", "embed.weight", tp="vocab"),
    WeightRule("lm_head.weight", "lm_head.weight", tp="vocab"),
]
for kind in ("weight", "bias"):
    WEIGHTS += [
        WeightRule(f"model.norm.{kind}", f"norm.{kind}"),
        WeightRule(f"{LAYER}.input_layernorm.{kind}", f"{OUT}.attn_norm.{kind}"),
        WeightRule(f"{LAYER}.post_attention_layernorm.{kind}", f"{OUT}.mlp_norm.{kind}"),
        *[WeightRule(f"{LAYER}.self_attn.{s}_proj.{kind}", f"{OUT}.attn.qkv.{kind}", s, "column")
          for s in "qkv"],
        WeightRule(f"{LAYER}.mlp.c_fc.{kind}", f"{OUT}.mlp.up.{kind}", tp="column"),
    ]  # fmt: skip
WEIGHTS += [
    WeightRule(f"{LAYER}.self_attn.o_proj.weight", f"{OUT}.attn.o_proj.weight", tp="row"),
    WeightRule(f"{LAYER}.self_attn.o_proj.bias", f"{OUT}.attn.o_proj.bias"),
    WeightRule(f"{LAYER}.mlp.c_proj.weight", f"{OUT}.mlp.down.weight", tp="row"),
    WeightRule(f"{LAYER}.mlp.c_proj.bias", f"{OUT}.mlp.down.bias"),
]


@register("model", "starcoder2")
class Starcoder2ForCausalLM(DecoderLM):
    """StarCoder2; loads Hugging Face ``starcoder2`` checkpoints."""

    hf_model_types = ("starcoder2",)
    weight_rules = tuple(WEIGHTS)

    # 2. The config: the config.json fields the family reads, with transformers' defaults.
    @dataclass(kw_only=True)
    class Config(ModelConfig):
        """StarCoder2 settings; the shape fields apply when no checkpoint is given."""

        vocab_size: int = 49152
        """Vocabulary size."""
        hidden_size: int = 3072
        """Model width."""
        intermediate_size: int = 12288
        """MLP width."""
        num_hidden_layers: int = 30
        """Decoder layers."""
        num_attention_heads: int = 24
        """Query heads."""
        num_key_value_heads: int = 2
        """KV heads."""
        max_position_embeddings: int = 4096
        """Longest context."""
        rope_theta: float = 10000.0
        """RoPE base."""
        rope_scaling: dict[str, Any] | None = None
        """RoPE scaling, as in Hugging Face."""
        norm_epsilon: float = 1e-5
        """LayerNorm epsilon."""
        hidden_act: str = "gelu_pytorch_tanh"
        """MLP activation."""
        use_bias: bool = True
        """Biases on every linear layer."""
        sliding_window: int | None = None
        """Attend to at most this many most recent tokens; None attends to all."""
        tie_word_embeddings: bool = True
        """Share the embedding matrix with the LM head."""
        eos_token_id: int | None = 50256
        """End-of-sequence token id."""

    # 3. The architecture: which registered block makes each part.
    @classmethod
    def arch(cls, s: Config) -> DecoderArch:
        n, heads, bias = s.num_hidden_layers, s.num_attention_heads, s.use_bias
        return DecoderArch(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=n, num_heads=heads,
            num_kv_heads=s.num_key_value_heads, head_dim=s.hidden_size // heads,
            intermediate_size=s.intermediate_size,
            max_position_embeddings=s.max_position_embeddings,
            tie_word_embeddings=s.tie_word_embeddings,
            norm=block("norm", "layer", eps=s.norm_epsilon),
            position=block("position", "rope", theta=s.rope_theta, scaling=s.rope_scaling),
            attention=block("attention", "qkv", bias=bias, out_bias=bias),
            mlp=block("mlp", "plain", intermediate=s.intermediate_size, act=s.hidden_act,
                      bias=bias),
            layer=block("layer", "pre_norm"),
            windows=(s.sliding_window,) * n if s.sliding_window else None, gated_mlp=False,
        )  # fmt: skip
