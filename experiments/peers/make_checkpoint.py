"""Write the peers' model as a Hugging Face checkpoint: Mistral architecture, hidden 512, 8 layers,
8 query / 2 KV heads of 64, MLP 1536, vocab 32000, untied, random N(0, 0.02) weights, fp32, with a
word-level tokenizer whose token i is the word ``t{i}`` (ids kept 1:1, so any engine can load it).

    python experiments/peers/make_checkpoint.py OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def make(out: Path, seed: int = 0) -> Path:
    """Create the checkpoint in ``out`` (skipped if it is already there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").is_file():
        return out
    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        sliding_window=None,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    MistralForCausalLM(cfg).save_pretrained(out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 32000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    print(make(parser.parse_args().out))
