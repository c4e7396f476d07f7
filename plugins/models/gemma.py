"""``model=gemma``: Gemma (Llama's layout with Gemma's ``1 + w`` RMSNorm, embeddings scaled by
sqrt(hidden_size), a GELU-tanh gated MLP, tied embeddings and head_dim 256)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.plugins.models.llama import LlamaShape, llama_arch, llama_rules
from modgen.registry import register


@register("model", "gemma")
class GemmaForCausalLM(DecoderLM):
    """Gemma decoder; loads Hugging Face ``gemma`` checkpoints."""

    hf_model_types = ("gemma",)
    weight_rules = llama_rules()

    @dataclass(kw_only=True)
    class Config(LlamaShape):
        """Gemma settings; the shape fields apply when no checkpoint is given."""

        vocab_size: int = 256000
        """Vocabulary size."""
        hidden_size: int = 3072
        """Model width."""
        intermediate_size: int = 24576
        """MLP width."""
        num_hidden_layers: int = 28
        """Decoder layers."""
        num_attention_heads: int = 16
        """Query heads."""
        num_key_value_heads: int | None = 16
        """KV heads."""
        head_dim: int | None = 256
        """Head size."""
        max_position_embeddings: int = 8192
        """Longest context."""
        hidden_act: str = "gelu_pytorch_tanh"
        """MLP activation (Gemma's "gelu" means the tanh approximation, as in transformers)."""
        hidden_activation: str | None = None
        """The activation under its older name; wins over hidden_act when set."""
        tie_word_embeddings: bool = True
        """Share the embedding matrix with the LM head."""
        use_bidirectional_attention: bool | None = None
        """Bidirectional attention (an encoder use of Gemma): not implemented."""
        eos_token_id: int | None = 1
        """End-of-sequence token id (config.json may give a list)."""

    @classmethod
    def arch(cls, s: Config) -> DecoderArch:
        if s.use_bidirectional_attention:
            raise ValueError("gemma: use_bidirectional_attention is not implemented (causal only)")
        act = s.hidden_activation or s.hidden_act
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        mlp = block("mlp", "gated", intermediate=s.intermediate_size, act=act)
        return replace(
            llama_arch(s), norm=block("norm", "gemma_rms", eps=s.rms_norm_eps), mlp=mlp,
            embed_scale=s.hidden_size**0.5,
        )  # fmt: skip
