"""What a finished request returns to its caller."""

from __future__ import annotations

from dataclasses import dataclass

from modgen.engine.sequence import RequestMetrics, Sequence


@dataclass
class RequestOutput:
    """A request's result: generated token ids and text, why it ended, and its timings."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestMetrics
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the request has ended."""
        return self.finish_reason is not None

    @classmethod
    def from_sequence(cls, seq: Sequence) -> RequestOutput:
        """Snapshot of ``seq``."""
        return cls(
            request_id=seq.request_id,
            prompt_token_ids=list(seq.prompt_token_ids),
            token_ids=seq.output_token_ids,
            text=seq.text,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            metrics=seq.metrics,
            error=seq.error,
        )
