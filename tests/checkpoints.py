"""Tiny Hugging Face checkpoints made by the tests (random weights, fixed seed) and the
transformers oracle they are compared with."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
EOS = 2


# overrides for a one-layer model of random weights at toy size, built with no checkpoint
TINY = ["model.num_hidden_layers=1", "model.vocab_size=128", "model.hidden_size=64",
        "model.intermediate_size=64", "model.num_attention_heads=4"]  # fmt: skip


COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
    eos_token_id=EOS, initializer_range=0.15, tie_word_embeddings=False,
)  # fmt: skip
LONGROPE = dict(  # Phi-3-128k's scaling at toy size: 4 short and 4 long factors (rotary dims 8)
    rope_type="longrope", short_factor=[1.0, 1.3, 2.1, 3.0], long_factor=[1.5, 2.0, 4.0, 8.0],
    original_max_position_embeddings=128, rope_theta=10000.0, partial_rotary_factor=0.5,
)  # fmt: skip
FAMILIES = {  # kind -> (transformers config class, its settings beyond COMMON)
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                  tie_word_embeddings=True)),  # layer 0 full, layer 1 windowed
    "qwen3": ("Qwen3Config", dict(head_dim=24, rms_norm_eps=1e-6)),  # head_dim != hidden / heads
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, max_position_embeddings=512,
                                original_max_position_embeddings=128, sliding_window=8,
                                rope_parameters=LONGROPE, pad_token_id=0)),
    "gemma": ("GemmaConfig", dict(head_dim=32, num_key_value_heads=1)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=48, mlp_only_layers=[0],
                                         shared_expert_intermediate_size=80)),
    "phi": ("PhiConfig", dict(hidden_size=80, num_key_value_heads=4, hidden_act="gelu_new",
                              rope_parameters=dict(rope_theta=10000.0, rope_type="default",
                                                   partial_rotary_factor=0.4))),  # head dim 20
    "falcon": ("FalconConfig", dict(multi_query=True, parallel_attn=True, bias=False,
                                    tie_word_embeddings=True)),  # 7B's layout
    "falcon_new": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2,
                                        bias=True, tie_word_embeddings=True)),  # 40B's layout
    "opt": ("OPTConfig", dict(ffn_dim=128, do_layer_norm_before=True, tie_word_embeddings=True)),
    "opt_post": ("OPTConfig", dict(ffn_dim=128, do_layer_norm_before=False,
                                   word_embed_proj_dim=32, tie_word_embeddings=True)),  # 350m's
}  # fmt: skip
FAMILY_OF = {"falcon_new": "falcon", "opt_post": "opt"}
"""The modgen model each test kind loads as (the others: its own name)."""


def tiny_config(kind: str, **overrides):
    """A transformers config of a tiny model: llama (Llama-3 RoPE scaling), mistral (sliding
    window 8), or one of FAMILIES."""
    import transformers
    from transformers import LlamaConfig, MistralConfig

    common = dict(COMMON, rms_norm_eps=1e-5)
    if kind in FAMILIES:
        cls_name, settings = FAMILIES[kind]
        values = {**COMMON, **settings, **overrides}
        if kind.startswith("opt"):
            values.pop("intermediate_size")
            values.pop("num_key_value_heads")
        if kind.startswith("falcon"):
            values.pop("intermediate_size")
            values.pop("num_key_value_heads")
        return getattr(transformers, cls_name)(**values)
    if kind == "llama":
        common["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        common["rope_theta"] = 5000.0
        common.update(overrides)
        return LlamaConfig(**common)
    common.update(sliding_window=8, rope_theta=10000.0)
    common.update(overrides)
    return MistralConfig(**common)


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer: token i is the word ``w{i}``; ids 0-2 are <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)


def make_checkpoint(
    path: Path, kind: str, seed: int = 0, shard_size: str | None = None, **overrides
) -> Path:
    """Save a tiny random checkpoint (safetensors, optionally sharded) with a tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    save_tokenizer(path)
    return path


def hf_model(path: Path, dtype=torch.float32):
    """The checkpoint loaded by transformers (eager attention), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by full re-forward each step (no cache, EOS ignored), and the logits
    of the last prompt token."""
    ids = list(prompt)
    first_logits = None
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        if first_logits is None:
            first_logits = logits
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], first_logits
