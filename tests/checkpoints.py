"""Tiny Hugging Face checkpoints made by the tests (random weights, fixed seed) and the
transformers oracle they are compared with."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
EOS = 2


def tiny_config(kind: str, **overrides):
    """A transformers config of a tiny llama or mistral (GQA 4:2)."""
    from transformers import LlamaConfig, MistralConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=EOS,
        initializer_range=0.15,
        tie_word_embeddings=False,
    )
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
