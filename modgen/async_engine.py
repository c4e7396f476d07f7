"""An asyncio front for the Engine: many concurrent streams, one step loop.

The engine is not thread-safe, so it is only touched by the loop task: requests and aborts are
queued and applied between steps, and each step runs in a worker thread so the event loop keeps
serving connections while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from modgen.engine import Engine
from modgen.outputs import RequestOutput
from modgen.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine already holds as many unfinished requests as it accepts."""


class EngineDeadError(RuntimeError):
    """The step loop failed or was stopped; the request cannot finish."""


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False


class AsyncEngine:
    """Runs ``engine`` in a background task; ``generate`` streams a request's outputs.

    ``max_queued`` bounds the unfinished requests (waiting plus running); beyond it ``generate``
    raises QueueFullError at once instead of queueing without limit.
    """

    def __init__(self, engine: Engine, max_queued: int | None = None) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self._streams: dict[str, _Stream] = {}
        self._pending: list[tuple[str, list[int] | str, SamplingParams, float]] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = 0
        self._closing = False
        self.error: BaseException | None = None

    # lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="modgen-engine")

    async def shutdown(self, grace: float = 0.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to ``grace`` seconds, abort the
        rest, and stop the loop."""
        self._closing = True
        deadline = time.monotonic() + grace
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for rid in list(self._streams):
            self.abort(rid)
        if self._task is not None:
            self._wake.set()
            while self._streams and not self._task.done():
                await asyncio.sleep(0.01)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def num_unfinished(self) -> int:
        """Requests accepted and not yet finished."""
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        """Whether the step loop is alive."""
        return self._task is not None and not self._task.done()

    # requests ---------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: list[int] | str,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its output each time it gains tokens (cumulative), the
        last one finished. Bad input raises BadRequestError before anything is yielded; a caller
        that stops iterating (a client that disconnects) aborts the request and frees its KV."""
        rid = self.submit(prompt, params or SamplingParams(), request_id)
        stream = self._streams[rid]
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(rid)

    def submit(
        self, prompt: list[int] | str, params: SamplingParams, request_id: str | None
    ) -> str:
        """Queue a request for the next step; returns its id (see ``generate``)."""
        if self._closing or (self._task is not None and self._task.done()):
            raise EngineDeadError("the engine is shutting down or has stopped")
        if self.max_queued is not None and len(self._streams) >= self.max_queued:
            raise QueueFullError(
                f"the engine holds {len(self._streams)} unfinished requests "
                f"(limit {self.max_queued}); retry later"
            )
        if request_id is None:
            self._ids += 1
            request_id = f"req-{self._ids}"
        if request_id in self._streams:
            raise ValueError(f"request id '{request_id}' is already in use")
        self._streams[request_id] = _Stream()
        self._pending.append((request_id, prompt, params, time.perf_counter()))
        self._wake.set()
        self.start()
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request at the next step boundary and free its KV."""
        if request_id in self._streams:
            self._aborts.append(request_id)
            self._wake.set()

    # the loop ---------------------------------------------------------------------------------

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for rid, prompt, params, arrival in pending:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            try:
                self.engine.add_request(prompt, params, request_id=rid, arrival_time=arrival)
            except Exception as exc:  # bad input: this request fails, the others go on
                self._close(rid, exc)
        aborts, self._aborts = self._aborts, []
        for rid in aborts:
            self.engine.abort(rid)
            seq = self.engine.requests.get(rid)
            self._close(rid, RequestOutput.from_sequence(seq) if seq else None)

    def _close(self, rid: str, last: RequestOutput | BaseException | None) -> None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.finished = True
            if last is not None:
                stream.queue.put_nowait(last)
        self.engine.release(rid)

    async def _loop(self) -> None:
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    if not (self._pending or self._aborts):
                        await self._wake.wait()
                    continue
                updated = await asyncio.to_thread(self.engine.step)
                for seq in updated:
                    out = RequestOutput.from_sequence(seq)
                    if seq.is_finished:
                        self._close(seq.request_id, out)
                    elif seq.request_id in self._streams:
                        self._streams[seq.request_id].queue.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the step loop broke: no accepted request may hang
            log.exception("engine loop failed")
            self.error = exc
            for rid in list(self._streams):
                self._close(rid, EngineDeadError(f"engine loop failed: {exc}"))
            raise
