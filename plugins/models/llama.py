"""``model=llama`` and ``model=mistral``: Llama-architecture decoders (GQA, RoPE, RMSNorm, SwiGLU),
with Mistral's sliding-window attention when the config sets ``sliding_window``. Also the
Llama-layout weight map and architecture other Llama-like families start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.model import ModelConfig
from modgen.registry import register
from modgen.weights import WeightRule


def llama_rules(layers: str = "model.layers.{i}", mlp: bool = True) -> tuple[WeightRule, ...]:
    """The Llama checkpoint layout: Hugging Face names -> modgen parameters (q/k/v and gate/up
    packed), with how each splits for tensor parallelism. ``mlp`` False leaves the MLP out (a
    family with experts maps its own)."""
    attn, out = f"{layers}.self_attn", "layers.{i}"
    rules = [
        WeightRule("model.embed_tokens.weight", "embed.weight", tp="vocab"),
        WeightRule("model.norm.weight", "norm.weight"),
        WeightRule("lm_head.weight", "lm_head.weight", tp="vocab"),
        WeightRule(f"{layers}.input_layernorm.weight", f"{out}.attn_norm.weight"),
        WeightRule(f"{layers}.post_attention_layernorm.weight", f"{out}.mlp_norm.weight"),
        WeightRule(f"{attn}.o_proj.weight", f"{out}.attn.o_proj.weight", tp="row"),
        WeightRule(f"{attn}.o_proj.bias", f"{out}.attn.o_proj.bias"),
        WeightRule(f"{attn}.q_norm.weight", f"{out}.attn.q_norm.weight"),
        WeightRule(f"{attn}.k_norm.weight", f"{out}.attn.k_norm.weight"),
    ]
    for kind in ("weight", "bias"):
        rules += [WeightRule(f"{attn}.{s}_proj.{kind}", f"{out}.attn.qkv.{kind}", s, "column")
                  for s in "qkv"]  # fmt: skip
    if mlp:
        rules += gated_mlp_rules(f"{layers}.mlp", f"{out}.mlp")
    return tuple(rules)


def gated_mlp_rules(hf: str, param: str) -> list[WeightRule]:
    """A gated MLP's gate_proj / up_proj / down_proj (weights and biases) under ``hf``."""
    rules = []
    for kind in ("weight", "bias"):
        rules += [
            WeightRule(f"{hf}.gate_proj.{kind}", f"{param}.gate_up.{kind}", "gate", "column"),
            WeightRule(f"{hf}.up_proj.{kind}", f"{param}.gate_up.{kind}", "up", "column"),
        ]
    rules += [
        WeightRule(f"{hf}.down_proj.weight", f"{param}.down.weight", tp="row"),
        WeightRule(f"{hf}.down_proj.bias", f"{param}.down.bias"),
    ]
    return rules


@dataclass(kw_only=True)
class LlamaShape(ModelConfig):
    """Architecture fields, named as in a Hugging Face config.json, with its defaults (the
    preset's values apply without a checkpoint; with one, config.json's)."""

    vocab_size: int = 32000
    """Vocabulary size."""
    hidden_size: int = 4096
    """Model width."""
    intermediate_size: int = 11008
    """MLP width."""
    num_hidden_layers: int = 32
    """Decoder layers."""
    num_attention_heads: int = 32
    """Query heads."""
    num_key_value_heads: int | None = None
    """KV heads (grouped-query attention when fewer than query heads); None: as many as query
    heads."""
    head_dim: int | None = None
    """Head size; None means hidden_size / num_attention_heads."""
    max_position_embeddings: int = 2048
    """Longest context."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling, as in Hugging Face (rope_type default, linear, llama3, dynamic, longrope)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    hidden_act: str = "silu"
    """MLP activation."""
    sliding_window: int | None = None
    """Attend to at most this many most recent tokens (Mistral); None attends to all."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections."""
    mlp_bias: bool = False
    """Biases on the MLP projections."""
    eos_token_id: int | None = 2
    """End-of-sequence token id (config.json may give a list)."""


def llama_arch(s: LlamaShape, windows: tuple[int | None, ...] | None = None) -> DecoderArch:
    """The Llama architecture of ``s``: pre-norm layers of RMSNorm, RoPE attention and a gated
    MLP. Llama-like families change the parts that differ with ``dataclasses.replace``."""
    heads = s.num_attention_heads
    return DecoderArch(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_hidden_layers,
        num_heads=heads, num_kv_heads=s.num_key_value_heads or heads,
        head_dim=s.head_dim or s.hidden_size // heads, intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=s.tie_word_embeddings,
        norm=block("norm", "rms", eps=s.rms_norm_eps),
        position=block("position", "rope", theta=s.rope_theta, scaling=s.rope_scaling),
        attention=block("attention", "qkv", bias=s.attention_bias, out_bias=s.attention_bias),
        mlp=block("mlp", "gated", intermediate=s.intermediate_size, act=s.hidden_act,
                  bias=s.mlp_bias),
        layer=block("layer", "pre_norm"),
        windows=windows,
    )  # fmt: skip


@register("model", "llama")
class LlamaForCausalLM(DecoderLM):
    """Llama 1/2/3 decoder; loads Hugging Face ``llama`` checkpoints (``sliding_window`` is not
    part of Llama and is ignored)."""

    hf_model_types = ("llama",)
    weight_rules = llama_rules()

    @dataclass(kw_only=True)
    class Config(LlamaShape):
        """Llama settings; the shape fields apply when no checkpoint is given."""

    @classmethod
    def arch(cls, shape: LlamaShape) -> DecoderArch:
        return llama_arch(shape)


@register("model", "mistral")
class MistralForCausalLM(DecoderLM):
    """Mistral decoder: Llama's layers, sliding-window attention if ``sliding_window`` is set."""

    hf_model_types = ("mistral",)
    weight_rules = llama_rules()

    @dataclass(kw_only=True)
    class Config(LlamaShape):
        """Mistral settings; the shape fields apply when no checkpoint is given."""

        max_position_embeddings: int = 32768
        """Longest context."""
        sliding_window: int | None = 4096
        """Attend to at most this many most recent tokens; None attends to all."""

    @classmethod
    def arch(cls, shape: LlamaShape) -> DecoderArch:
        n, window = shape.num_hidden_layers, shape.sliding_window
        return llama_arch(shape, windows=(window,) * n if window else None)
