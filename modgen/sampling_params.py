"""Per-request generation parameters."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """Softmax temperature; 0 picks the most likely token."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; in (0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same output whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output text ends before the first one found."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (kept in token_ids, left out of the text)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise BadRequestError naming the first impossible value."""
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0"),
            (_is_num(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 keeps all)"),
            (_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (self.seed is None or _is_int(self.seed), "seed", "an integer or None"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (all(_is_int(t) for t in self.stop_token_ids), "stop_token_ids", "integers"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise BadRequestError(
                    f"{name} must be {expected}, got {getattr(self, name)!r}", name
                )
        if self.min_tokens > self.max_tokens:
            raise BadRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )

    @property
    def greedy(self) -> bool:
        """Whether this request takes the arg-max token."""
        return self.temperature == 0 or self.top_k == 1


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN
