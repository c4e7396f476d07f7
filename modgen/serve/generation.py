"""One HTTP request's generation on the AsyncEngine: its choices (prompts x n), their merged
output stream, and incremental text for streaming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from modgen.engine.async_engine import AsyncEngine
from modgen.outputs import RequestOutput
from modgen.sampling_params import SamplingParams


class TextStream:
    """Incremental detokenization of one choice's output.

    Each update decodes only a short window (from the token before the last emitted text), so a
    character that spans several tokens is emitted once complete (no U+FFFD half characters) and
    a tokenizer that adds spaces between words gets them right. Text that could be the start of
    a stop string is held back until it is known not to be one; the final text is the engine's.
    """

    def __init__(self, tokenizer: Any | None, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.num_sent = 0
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _update(self, token_ids: list[int]) -> None:
        self.ids.extend(token_ids[len(self.ids) :])
        if self.tokenizer is None or len(self.ids) == self._read:
            return
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def delta(self, out: RequestOutput) -> str:
        """The text to send for this output snapshot (all of what is left once finished)."""
        if out.finished:
            target = out.text
        else:
            self._update(out.token_ids)
            target = self.text[: len(self.text) - _holdback(self.text, self.stop)]
        if len(target) <= self.num_sent:
            return ""
        piece = target[self.num_sent :]
        self.num_sent = len(target)
        return piece


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclass
class Choice:
    """One generated sequence of a request: prompt ``prompt_index``, choice ``index``."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    priority: int = 0
    request_id: str | None = None
    output: RequestOutput | None = field(default=None, repr=False)


class Generation:
    """The choices of one HTTP request, submitted together and streamed merged.

    ``submit`` checks the queue limit for all choices first, so a request is taken whole or
    refused whole. ``abort`` cancels whatever has not finished (e.g. the client went away).
    """

    def __init__(self, aengine: AsyncEngine, choices: list[Choice]) -> None:
        self.aengine, self.choices = aengine, choices
        self._iters: list[AsyncIterator[RequestOutput]] = []

    def submit(self) -> None:
        """Queue every choice (QueueFullError / EngineDeadError refuse the whole request)."""
        self.aengine.check_capacity(len(self.choices))
        try:
            for choice in self.choices:
                choice.request_id = self.aengine.submit(
                    choice.prompt_ids, choice.params, None, priority=choice.priority
                )
                self._iters.append(self.aengine.outputs(choice.request_id))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Abort every choice that has not finished; safe to call many times."""
        for choice in self.choices:
            if choice.request_id is not None and (
                choice.output is None or not choice.output.finished
            ):
                self.aengine.abort(choice.request_id)

    async def stream(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Each choice's cumulative outputs, merged in arrival order; an engine error (e.g. bad
        input found at admission) is raised. Closing it early aborts the rest."""
        queue: asyncio.Queue[tuple[Choice, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(choice: Choice, it: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in it:
                    queue.put_nowait((choice, out))
            except Exception as exc:
                queue.put_nowait((choice, exc))
            finally:
                queue.put_nowait((choice, None))

        tasks = [
            asyncio.ensure_future(pump(c, it))
            for c, it in zip(self.choices, self._iters, strict=True)
        ]
        try:
            live = len(tasks)
            while live:
                choice, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                choice.output = item
                yield choice, item
        finally:
            self.abort()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self) -> list[RequestOutput]:
        """Run to the end; the final output of every choice, in choice order."""
        async with contextlib.aclosing(self.stream()) as outputs:
            async for _ in outputs:
                pass
        return [c.output for c in self.choices]  # type: ignore[misc]

    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the request (each prompt once, however many choices it has)."""
        seen: dict[int, int] = {c.prompt_index: len(c.prompt_ids) for c in self.choices}
        return sum(seen.values())

    def num_output_tokens(self) -> int:
        """Tokens generated so far over all choices."""
        return sum(len(c.output.token_ids) for c in self.choices if c.output is not None)
