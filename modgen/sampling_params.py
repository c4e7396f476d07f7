"""Per-request generation parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_SEED = 2**63
"""Seeds are integers in [0, MAX_SEED) (what a torch generator takes)."""
GREEDY_BELOW = 1e-5
"""A temperature below this samples greedily (dividing logits by it would overflow)."""


class BadRequestError(ValueError):
    """A request the engine will not run; ``field`` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(kw_only=True)
class SamplingParams:
    """How one request is generated. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    """Most tokens to generate."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens are generated."""
    temperature: float = 1.0
    """Softmax temperature, finite; 0 (or below 1e-5) picks the most likely token."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all, as does any k beyond the vocabulary."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; in (0, 1]."""
    seed: int | None = None
    """Per-request seed in [0, 2^63): the same seed gives the same output whatever else is in
    the batch."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output text ends before the first one found."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (kept in token_ids, left out of the text); the engine
    checks that they are in its vocabulary."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise BadRequestError naming the first impossible value. Limits that depend on the
        model (token ids, the context) are the engine's to check."""
        t, p = self.temperature, self.top_p
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0"),
            (_is_num(t) and t >= 0, "temperature", "a finite number >= 0"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 keeps all)"),
            (_is_num(p) and 0 < p <= 1, "top_p", "a number in (0, 1]"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < MAX_SEED), "seed",
             "an integer in [0, 2^63) or None"),
            (_is_list(self.stop, lambda s: isinstance(s, str) and s != ""), "stop",
             "a list of non-empty strings"),
            (_is_list(self.stop_token_ids, _is_int), "stop_token_ids", "a list of integers"),
            (isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean"),
        ]  # fmt: skip
        for ok, name, expected in checks:
            if not ok:
                shown = f"{getattr(self, name)!r}"[:80]
                raise BadRequestError(f"{name} must be {expected}, got {shown}", name)
        if self.min_tokens > self.max_tokens:
            raise BadRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )

    def check_model(
        self, vocab_size: int, context: int, num_prompt_tokens: int, cap_max_tokens: bool = False
    ) -> int:
        """Raise BadRequestError unless these parameters suit a model of ``vocab_size`` tokens
        and a ``context`` of that many tokens, after a prompt of ``num_prompt_tokens``; returns
        the tokens that may be generated: ``max_tokens``, with ``cap_max_tokens`` at most what
        the context has room for."""
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise BadRequestError(
                f"stop_token_ids must be token ids in [0, {vocab_size}), got {bad[:5]}",
                "stop_token_ids",
            )
        room = context - num_prompt_tokens
        for name in ("min_tokens", "max_tokens"):
            asked = getattr(self, name)
            if asked > room and (name == "min_tokens" or not cap_max_tokens):
                raise BadRequestError(
                    f"{name} is {asked}, but the prompt's {num_prompt_tokens} tokens leave room "
                    f"for {room} in the model's context of {context} tokens",
                    name,
                )
        return min(self.max_tokens, room)

    @property
    def greedy(self) -> bool:
        """Whether this request takes the arg-max token."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def _is_list(x: object, item_ok: Callable[[Any], bool]) -> bool:
    return isinstance(x, list) and all(item_ok(i) for i in x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    """A finite real number (not NaN, not infinite, not a bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False
