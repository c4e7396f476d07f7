"""``model=qwen3``: Qwen3 (Qwen2's layout with an RMSNorm over each query and key head before
RoPE, no q/k/v biases unless ``attention_bias``, and an explicit ``head_dim``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.plugins.models.llama import llama_arch, llama_rules
from modgen.plugins.models.qwen2 import QwenShape, qwen_windows
from modgen.registry import register


@register("model", "qwen3")
class Qwen3ForCausalLM(DecoderLM):
    """Qwen3 decoder; loads Hugging Face ``qwen3`` checkpoints."""

    hf_model_types = ("qwen3",)
    weight_rules = llama_rules()

    @dataclass(kw_only=True)
    class Config(QwenShape):
        """Qwen3 settings; the shape fields apply when no checkpoint is given."""

        head_dim: int | None = 128
        """Head size (Qwen3's is not hidden_size / heads)."""

    @classmethod
    def arch(cls, shape: QwenShape) -> DecoderArch:
        bias = shape.attention_bias
        qk_norm = block("norm", "rms", eps=shape.rms_norm_eps)
        qkv = block("attention", "qkv", bias=bias, out_bias=bias, qk_norm=qk_norm)
        return replace(llama_arch(shape, qwen_windows(shape)), attention=qkv)
