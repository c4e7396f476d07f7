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
