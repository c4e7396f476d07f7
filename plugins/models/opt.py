"""``model=opt``: OPT (learned positions read at position + 2, LayerNorm before each block or,
with ``do_layer_norm_before`` false as in OPT-350m, after it; ReLU MLP; biases; queries scaled
after their projection; embeddings projected in and out when ``word_embed_proj_dim`` differs)."""

from __future__ import annotations

from dataclasses import dataclass

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.model import ModelConfig
from modgen.registry import register
from modgen.weights import WeightRule

DEC, LAYER, OUT = "model.decoder", "model.decoder.layers.{i}", "layers.{i}"
WEIGHTS = [
    WeightRule(f"{DEC}.embed_tokens.weight", "embed.weight", tp="vocab"),
    WeightRule(f"{DEC}.embed_positions.weight", "position.weight"),
    WeightRule(f"{DEC}.project_in.weight", "project_in.weight"),
    WeightRule(f"{DEC}.project_out.weight", "project_out.weight"),
    WeightRule("lm_head.weight", "lm_head.weight", tp="vocab"),
    WeightRule(f"{LAYER}.self_attn.out_proj.weight", f"{OUT}.attn.o_proj.weight", tp="row"),
    WeightRule(f"{LAYER}.self_attn.out_proj.bias", f"{OUT}.attn.o_proj.bias"),
    WeightRule(f"{LAYER}.fc2.weight", f"{OUT}.mlp.down.weight", tp="row"),
    WeightRule(f"{LAYER}.fc2.bias", f"{OUT}.mlp.down.bias"),
]
for _kind in ("weight", "bias"):
    WEIGHTS += [
        WeightRule(f"{DEC}.final_layer_norm.{_kind}", f"norm.{_kind}"),
        WeightRule(f"{LAYER}.self_attn_layer_norm.{_kind}", f"{OUT}.attn_norm.{_kind}"),
        WeightRule(f"{LAYER}.final_layer_norm.{_kind}", f"{OUT}.mlp_norm.{_kind}"),
        *[WeightRule(f"{LAYER}.self_attn.{s}_proj.{_kind}", f"{OUT}.attn.qkv.{_kind}", s, "column")
          for s in "qkv"],
        WeightRule(f"{LAYER}.fc1.{_kind}", f"{OUT}.mlp.up.{_kind}", tp="column"),
    ]  # fmt: skip


@register("model", "opt")
class OPTForCausalLM(DecoderLM):
    """OPT decoder; loads Hugging Face ``opt`` checkpoints."""

    hf_model_types = ("opt",)
    weight_rules = tuple(WEIGHTS)

    @dataclass(kw_only=True)
    class Config(ModelConfig):
        """OPT settings (Hugging Face names and defaults); the shape fields apply when no
        checkpoint is given."""

        vocab_size: int = 50272
        """Vocabulary size."""
        hidden_size: int = 768
        """Model width."""
        ffn_dim: int = 3072
        """MLP width."""
        num_hidden_layers: int = 12
        """Decoder layers."""
        num_attention_heads: int = 12
        """Attention heads."""
        max_position_embeddings: int = 2048
        """Longest context."""
        do_layer_norm_before: bool = True
        """LayerNorm before each block (pre-norm); false: after (post-norm, OPT-350m)."""
        word_embed_proj_dim: int | None = None
        """Width of the token embeddings (None: hidden_size); projected in and out if it
        differs."""
        activation_function: str = "relu"
        """MLP activation."""
        enable_bias: bool = True
        """Biases on the linear layers."""
        layer_norm_elementwise_affine: bool = True
        """LayerNorms with a weight and bias."""
        tie_word_embeddings: bool = True
        """Share the embedding matrix with the LM head."""
        eos_token_id: int | None = 2
        """End-of-sequence token id (config.json may give a list)."""

    @classmethod
    def arch(cls, s: Config) -> DecoderArch:
        heads, bias = s.num_attention_heads, s.enable_bias
        proj = s.word_embed_proj_dim
        return DecoderArch(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_hidden_layers,
            num_heads=heads, num_kv_heads=heads, head_dim=s.hidden_size // heads,
            intermediate_size=s.ffn_dim, max_position_embeddings=s.max_position_embeddings,
            tie_word_embeddings=s.tie_word_embeddings,
            norm=block("norm", "layer", affine=s.layer_norm_elementwise_affine),
            position=block("position", "learned", offset=2),
            attention=block("attention", "qkv", bias=bias, out_bias=bias, prescale=True),
            mlp=block("mlp", "plain", intermediate=s.ffn_dim, act=s.activation_function,
                      bias=bias),
            layer=block("layer", "pre_norm" if s.do_layer_norm_before else "post_norm"),
            final_norm=s.do_layer_norm_before,
            embed_dim=proj if proj and proj != s.hidden_size else None, gated_mlp=False,
        )  # fmt: skip
