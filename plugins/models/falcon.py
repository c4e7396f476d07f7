"""``model=falcon``: Falcon in both layouts: 7B's (multi-query attention, attention and MLP in
parallel on one LayerNorm's output) and 40B/180B's ``new_decoder_architecture`` (grouped KV
heads, fused q/k/v grouped per KV head, separate LayerNorms for attention and MLP); also the
sequential layout (``parallel_attn`` false). ALiBi is refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.model import ModelConfig
from modgen.registry import register
from modgen.weights import WeightRule

LAYER, OUT = "transformer.h.{i}", "layers.{i}"
NORMS = {  # layout -> checkpoint names of the attention's and the MLP's norms
    "parallel": ("input_layernorm", None),
    "parallel2": ("ln_attn", "ln_mlp"),
    "sequential": ("input_layernorm", "post_attention_layernorm"),
}


def falcon_rules(layout: str) -> list[WeightRule]:
    """Falcon's weight names for a layer layout (its norms are named by layout)."""
    attn_norm, mlp_norm = NORMS[layout]
    rules = [
        WeightRule("transformer.word_embeddings.weight", "embed.weight", tp="vocab"),
        WeightRule("lm_head.weight", "lm_head.weight", tp="vocab"),
    ]
    for kind in ("weight", "bias"):
        rules += [
            WeightRule(f"transformer.ln_f.{kind}", f"norm.{kind}"),
            WeightRule(f"{LAYER}.{attn_norm}.{kind}", f"{OUT}.attn_norm.{kind}"),
            WeightRule(f"{LAYER}.self_attention.query_key_value.{kind}", f"{OUT}.attn.qkv.{kind}",
                       tp="column"),
            WeightRule(f"{LAYER}.mlp.dense_h_to_4h.{kind}", f"{OUT}.mlp.up.{kind}", tp="column"),
        ]  # fmt: skip
        if mlp_norm:
            rules.append(WeightRule(f"{LAYER}.{mlp_norm}.{kind}", f"{OUT}.mlp_norm.{kind}"))
    return [
        *rules,
        WeightRule(f"{LAYER}.self_attention.dense.weight", f"{OUT}.attn.o_proj.weight", tp="row"),
        WeightRule(f"{LAYER}.self_attention.dense.bias", f"{OUT}.attn.o_proj.bias"),
        WeightRule(f"{LAYER}.mlp.dense_4h_to_h.weight", f"{OUT}.mlp.down.weight", tp="row"),
        WeightRule(f"{LAYER}.mlp.dense_4h_to_h.bias", f"{OUT}.mlp.down.bias"),
    ]


@dataclass(kw_only=True)
class FalconShape(ModelConfig):
    """Falcon config fields (Hugging Face names and defaults)."""

    vocab_size: int = 65024
    """Vocabulary size."""
    hidden_size: int = 4544
    """Model width."""
    num_hidden_layers: int = 32
    """Decoder layers."""
    num_attention_heads: int = 71
    """Query heads."""
    num_kv_heads: int | None = None
    """KV heads of the new decoder architecture (None: as many as query heads)."""
    new_decoder_architecture: bool = False
    """40B/180B layout: grouped KV heads, two LayerNorms per layer."""
    multi_query: bool = True
    """One KV head (7B), when not the new architecture."""
    parallel_attn: bool = True
    """Attention and MLP in parallel on the same normed input."""
    num_ln_in_parallel_attn: int | None = None
    """LayerNorms per parallel layer of the new architecture (None: 2)."""
    alibi: bool = False
    """ALiBi position bias instead of RoPE: not implemented."""
    bias: bool = False
    """Biases on the linear layers."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    ffn_hidden_size: int | None = None
    """MLP width (None: 4 x hidden_size)."""
    activation: str = "gelu"
    """MLP activation."""
    max_position_embeddings: int = 2048
    """Longest context."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling, as in Hugging Face."""
    tie_word_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    eos_token_id: int | None = 11
    """End-of-sequence token id (config.json may give a list)."""


def falcon_layout(s: FalconShape) -> str:
    """``parallel``, ``parallel2`` (two norms) or ``sequential``; refuses what Falcon's own code
    cannot run (the new architecture without parallel attention) and ALiBi."""
    if s.alibi:
        raise ValueError("falcon: alibi=true (ALiBi position bias) is not implemented")
    if s.new_decoder_architecture:
        if not s.parallel_attn:
            raise ValueError("falcon: new_decoder_architecture with parallel_attn=false")
        return "parallel" if s.num_ln_in_parallel_attn == 1 else "parallel2"
    return "parallel" if s.parallel_attn else "sequential"


@register("model", "falcon")
class FalconForCausalLM(DecoderLM):
    """Falcon decoder; loads Hugging Face ``falcon`` checkpoints."""

    hf_model_types = ("falcon",)
    weight_rules = tuple(falcon_rules("parallel"))

    @dataclass(kw_only=True)
    class Config(FalconShape):
        """Falcon settings; the shape fields apply when no checkpoint is given."""

    @classmethod
    def arch(cls, s: FalconShape) -> DecoderArch:
        layout, heads = falcon_layout(s), s.num_attention_heads
        if s.new_decoder_architecture:
            kv_heads, qkv = s.num_kv_heads or heads, "falcon_grouped"
        elif s.multi_query:
            kv_heads, qkv = 1, "packed"  # q heads, then the one k and v: modgen's order
        else:
            kv_heads, qkv = heads, "falcon_interleaved"
        layer = block("layer", "pre_norm") if layout == "sequential" else block(
            "layer", "parallel", norms=2 if layout == "parallel2" else 1
        )  # fmt: skip
        inter = s.ffn_hidden_size or 4 * s.hidden_size
        return DecoderArch(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_hidden_layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=s.hidden_size // heads,
            intermediate_size=inter, max_position_embeddings=s.max_position_embeddings,
            tie_word_embeddings=s.tie_word_embeddings,
            norm=block("norm", "layer", eps=s.layer_norm_epsilon),
            position=block("position", "rope", theta=s.rope_theta, scaling=s.rope_scaling),
            attention=block("attention", "qkv", bias=s.bias, out_bias=s.bias, layout=qkv),
            mlp=block("mlp", "plain", intermediate=inter, act=s.activation, bias=s.bias),
            layer=layer, gated_mlp=False, extra={"layout": layout},
        )  # fmt: skip

    def checkpoint_rules(self) -> list[WeightRule]:
        return falcon_rules(self.arch.extra["layout"])
