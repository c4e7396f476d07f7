"""Tokenizer loading from a Hugging Face checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(checkpoint: str | None) -> Any | None:
    """The checkpoint's tokenizer (transformers' AutoTokenizer), or None if it ships none."""
    if checkpoint is None or not any((Path(checkpoint) / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def max_token_chars(tokenizer: Any) -> int | None:
    """Characters of the longest token in ``tokenizer``'s vocabulary (None if it cannot say).

    A text of ``n`` characters then has at least ``n / max_token_chars`` tokens, so a text far
    too long for the context can be refused without tokenizing it. (A token's vocabulary form
    is never shorter than the text it covers: byte-level pieces take a character per byte.
    A word-level vocabulary's unknown token is the exception: it may stand for a longer word.)
    """
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return None
    return max((len(t) for t in vocab), default=0) or None
