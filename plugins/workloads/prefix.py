"""Workloads whose prompts share prefixes: ``shared_prefix`` (system prompts) and ``multiturn``
(conversations that resend their history)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from modgen.registry import register
from modgen.workload import RequestSpec, Workload, WorkloadConfig, check_range


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(n)]


@register("workload", "shared_prefix")
class SharedPrefixWorkload(Workload):
    """``num_prefixes`` system prompts of ``prefix_len`` tokens; each request is one of them,
    drawn at random, followed by a suffix of its own (the chat or agent case prefix caching
    is for)."""

    @dataclass(kw_only=True)
    class Config(WorkloadConfig):
        """Shared system prompts with unique suffixes."""

        num_prefixes: int = 4
        """Distinct shared prefixes (K)."""
        prefix_len: int = 512
        """Tokens of each shared prefix (S)."""
        suffix_len: list[int] = field(default_factory=lambda: [32, 128])
        """Unique suffix lengths are uniform in [min, max]."""
        output_len: list[int] = field(default_factory=lambda: [32, 128])
        """Output lengths are uniform in [min, max]."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.num_prefixes < 1 or self.prefix_len < 1:
                raise ValueError("workload.num_prefixes and workload.prefix_len must be >= 1")
            check_range("suffix_len", self.suffix_len)
            check_range("output_len", self.output_len)

    config: Config

    def requests(self, vocab_size: int) -> list[RequestSpec]:
        c = self.config
        rng = random.Random(c.seed)
        prefixes = [_tokens(rng, c.prefix_len, vocab_size) for _ in range(c.num_prefixes)]
        specs = []
        for _ in range(c.num_requests):
            prefix = prefixes[rng.randrange(c.num_prefixes)]
            suffix = _tokens(rng, rng.randint(*c.suffix_len), vocab_size)
            specs.append(RequestSpec(prefix + suffix, rng.randint(*c.output_len)))
        return specs


@register("workload", "multiturn")
class MultiTurnWorkload(Workload):
    """Conversations of ``turns`` turns. Each turn's prompt is the conversation so far (a
    system prompt shared by all, then every earlier message and answer) plus a new message;
    the answers in the history are the workload's own, drawn from its seed with the length the
    turn generates, so every engine is sent the same prompts. Requests go turn by turn across
    conversations (every first turn, then every second turn...): with at least as many
    conversations as clients, a turn is usually sent after the one before it has finished."""

    @dataclass(kw_only=True)
    class Config(WorkloadConfig):
        """Multi-turn conversations that resend their history."""

        turns: int = 4
        """Turns per conversation (``num_requests`` in all, so num_requests / turns
        conversations, rounded up)."""
        system_len: int = 0
        """Tokens of a system prompt every conversation starts with (0: none)."""
        message_len: list[int] = field(default_factory=lambda: [32, 128])
        """Each new message's length, uniform in [min, max]."""
        output_len: list[int] = field(default_factory=lambda: [32, 128])
        """Each answer's length, uniform in [min, max]."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.turns < 1 or self.system_len < 0:
                raise ValueError("workload.turns must be >= 1 and workload.system_len >= 0")
            check_range("message_len", self.message_len)
            check_range("output_len", self.output_len)

    config: Config

    def requests(self, vocab_size: int) -> list[RequestSpec]:
        c = self.config
        rng = random.Random(c.seed)
        system = _tokens(rng, c.system_len, vocab_size)
        num_convs = -(-c.num_requests // c.turns)
        histories = [list(system) for _ in range(num_convs)]
        specs: list[RequestSpec] = []
        for _ in range(c.turns):
            for history in histories:
                if len(specs) == c.num_requests:
                    return specs
                history += _tokens(rng, rng.randint(*c.message_len), vocab_size)
                output_len = rng.randint(*c.output_len)
                specs.append(RequestSpec(list(history), output_len))
                history += _tokens(rng, output_len, vocab_size)  # the answer, for later turns
        return specs
