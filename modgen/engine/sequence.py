"""A request's sequence: the metadata the engine, scheduler and executor share (no tensors)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from modgen.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"  # holds no KV; prompt (or prompt + output, after preemption) to compute
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed inside the engine


@dataclass
class RequestMetrics:
    """Wall-clock stamps (``time.perf_counter`` seconds) of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    """When each generated token was committed."""
    num_preemptions: int = 0
    num_cached_tokens: int | None = None
    """Prompt tokens whose KV was found in the prefix cache when the request was first admitted
    (None until then)."""

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(eq=False)
class Sequence:
    """One request's tokens and KV progress.

    ``token_ids`` holds prompt then output; ``num_computed`` counts the tokens whose KV is in the
    cache. Tokens ``[num_computed, len(token_ids))`` are pending: the whole prompt at first, then
    one token per decode step, or prompt plus output again after a preemption.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int
    """Prompt plus the most tokens this request may generate (capped by the model's context)."""
    arrival_time: float = field(default_factory=time.perf_counter)
    priority: int = 0
    """Scheduling priority: lower values first (vLLM's convention); schedulers may ignore it."""
    token_ids: list[int] = field(init=False)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    text: str = ""
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose KV still has to be computed."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_decode(self) -> bool:
        """Whether the next step for this sequence is a single-token decode."""
        return self.num_computed > 0 and self.num_pending == 1 and self.num_output_tokens > 0

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        """Whether the request has ended."""
        return self.status is SeqStatus.FINISHED
