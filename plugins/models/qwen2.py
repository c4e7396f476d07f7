"""``model=qwen2``: Qwen2 / Qwen2.5 (Llama's layers with q/k/v biases, sliding windows on the
layers ``layer_types`` or ``max_window_layers`` picks)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from modgen.blocks import block
from modgen.blocks.decoder import DecoderArch, DecoderLM
from modgen.blocks.hf import layer_windows
from modgen.plugins.models.llama import LlamaShape, llama_arch, llama_rules
from modgen.registry import register


@dataclass(kw_only=True)
class QwenShape(LlamaShape):
    """Qwen config fields (Hugging Face names and defaults)."""

    vocab_size: int = 151936
    """Vocabulary size."""
    intermediate_size: int = 22016
    """MLP width."""
    num_key_value_heads: int | None = 32
    """KV heads."""
    max_position_embeddings: int = 32768
    """Longest context."""
    use_sliding_window: bool = False
    """Whether any layer has a sliding window."""
    sliding_window: int | None = 4096
    """The window of the layers that have one."""
    max_window_layers: int = 28
    """Without ``layer_types``: layers from this index on have the window."""
    layer_types: list[str] | None = None
    """Per layer: full_attention or sliding_attention."""
    eos_token_id: int | None = None
    """End-of-sequence token id (config.json may give a list)."""


def qwen_windows(s: QwenShape) -> tuple[int | None, ...]:
    """Qwen2/Qwen3 windows: ``layer_types``, else layers from ``max_window_layers`` on."""
    n = s.num_hidden_layers
    window = s.sliding_window if s.use_sliding_window else None
    return layer_windows(n, window, s.layer_types, [i >= s.max_window_layers for i in range(n)])


@register("model", "qwen2")
class Qwen2ForCausalLM(DecoderLM):
    """Qwen2 decoder; loads Hugging Face ``qwen2`` checkpoints."""

    hf_model_types = ("qwen2",)
    weight_rules = llama_rules()

    @dataclass(kw_only=True)
    class Config(QwenShape):
        """Qwen2 settings; the shape fields apply when no checkpoint is given."""

    @classmethod
    def arch(cls, shape: QwenShape) -> DecoderArch:
        qkv = block("attention", "qkv", bias=True, out_bias=False)
        return replace(llama_arch(shape, qwen_windows(shape)), attention=qkv)
