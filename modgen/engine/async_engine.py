"""An asyncio front for the Engine: many concurrent streams, one step loop.

The engine is not thread-safe, so it is only touched by the loop task: requests and aborts are
queued and applied between steps, and each step runs on a worker thread of its own (always the
same one) so the event loop keeps serving connections while the model computes. On a virtual
clock (a simulation) steps run inline: they take no real time, and the event loop's time is the
clock's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from modgen.cpu_tuning import release_openmp_threads
from modgen.engine.engine import Engine, StepStats
from modgen.outputs import RequestOutput
from modgen.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine already holds as many unfinished requests as it accepts."""


class EngineDeadError(RuntimeError):
    """The step loop failed or was stopped; the request cannot finish."""


class EngineHooks:
    """Callbacks of the step loop (on the event loop's thread), e.g. for metrics; override what
    you need. They must be quick and must not raise."""

    def on_step(self, stats: StepStats) -> None:
        """A step ran."""

    def on_finish(self, output: RequestOutput) -> None:
        """A request ended (finished, aborted or failed inside the engine); not called for
        requests refused before they ran."""


@dataclass
class _Stream:
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False


class AsyncEngine:
    """Runs ``engine`` in a background task; ``generate`` streams a request's outputs.

    ``max_queued`` bounds the unfinished requests (waiting plus running); beyond it ``generate``
    raises QueueFullError at once instead of queueing without limit. ``hooks`` observe steps and
    finished requests; ``max_step_stats`` bounds ``engine.stats`` (a long-running server would
    otherwise keep one entry per step forever; None keeps all).

    A request that fails inside the engine ends alone (the engine isolates it). The loop
    itself stops when the engine reports itself unhealthy (``Engine.is_healthy``) or a step
    raises: every unfinished request then gets EngineDeadError, and ``on_failure`` is called
    with the cause (e.g. to exit the process so that a supervisor restarts it).
    """

    def __init__(
        self,
        engine: Engine,
        max_queued: int | None = None,
        *,
        hooks: EngineHooks | None = None,
        max_step_stats: int | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        engine.scheduler.set_online(True)  # clients wait on each token
        self.max_queued = max_queued
        self.hooks = hooks
        self.max_step_stats = max_step_stats
        self.on_failure = on_failure
        self._streams: dict[str, _Stream] = {}
        self._pending: list[tuple[str, list[int] | str, SamplingParams, float, int]] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stepper: ThreadPoolExecutor | None = None
        self._ids = 0
        self._closing = False
        self.error: BaseException | None = None

    # lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop on the running event loop. Steps run on one thread of their own
        (always the same one: one OpenMP thread pool), and this thread, which usually built the
        model, gives its OpenMP threads back (see ``release_openmp_threads``)."""
        if self._task is None:
            if not self.engine.clock.virtual and self._stepper is None:
                self._stepper = ThreadPoolExecutor(1, thread_name_prefix="modgen-step")
                release_openmp_threads()
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
        if self._stepper is not None:
            self._stepper.shutdown(wait=False)
            self._stepper = None

    @property
    def num_unfinished(self) -> int:
        """Requests accepted and not yet finished."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests accepted that hold no KV yet (queued for the next step, or waiting)."""
        return len(self._pending) + self.engine.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        """Requests holding KV."""
        return self.engine.scheduler.num_running

    @property
    def is_running(self) -> bool:
        """Whether the step loop is alive."""
        return self._task is not None and not self._task.done()

    @property
    def is_accepting(self) -> bool:
        """Whether ``submit`` takes new requests (not shutting down, loop not failed)."""
        return not self._closing and self.error is None

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise QueueFullError unless ``num_requests`` more requests fit under the limit now
        (e.g. all ``n`` choices of one HTTP request, before submitting any)."""
        if self.max_queued is not None and len(self._streams) + num_requests > self.max_queued:
            raise QueueFullError(
                f"the engine holds {len(self._streams)} unfinished requests (limit "
                f"{self.max_queued}); {num_requests} more do not fit"
            )

    # requests ---------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: list[int] | str,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its output each time it gains tokens (cumulative), the
        last one finished. Bad input raises BadRequestError before anything is yielded; a caller
        that stops iterating (a client that disconnects) aborts the request and frees its KV.
        ``arrival_time`` (the engine's clock) defaults to now; ``priority`` as in
        ``Engine.add_request``."""
        rid = self.submit(prompt, params or SamplingParams(), request_id, arrival_time, priority)
        async with contextlib.aclosing(self.outputs(rid)) as outputs:
            async for out in outputs:
                yield out

    def outputs(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of a request just queued with ``submit``, streamed as ``generate`` streams
        them; call it right after ``submit`` and iterate it once. Closing it early aborts the
        request."""
        stream = self._streams.get(request_id)
        if stream is None:
            raise KeyError(f"no unfinished request '{request_id}'")
        return self._iterate(request_id, stream)

    async def _iterate(self, rid: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
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
        self,
        prompt: list[int] | str,
        params: SamplingParams,
        request_id: str | None,
        arrival_time: float | None = None,
        priority: int = 0,
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
        arrival = self.engine.clock.now() if arrival_time is None else arrival_time
        self._pending.append((request_id, prompt, params, arrival, priority))
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
        for rid, prompt, params, arrival, priority in pending:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            try:
                self.engine.add_request(prompt, params, rid, arrival, priority)
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
        if self.hooks is not None and isinstance(last, RequestOutput):
            self.hooks.on_finish(last)

    def _after_step(self, num_stats_before: int) -> None:
        stats = self.engine.stats
        if self.hooks is not None:
            for st in stats[num_stats_before:]:
                self.hooks.on_step(st)
        if self.max_step_stats is not None and len(stats) > self.max_step_stats:
            del stats[: len(stats) - self.max_step_stats]

    async def _loop(self) -> None:
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    if not (self._pending or self._aborts):
                        await self._wake.wait()
                    continue
                num_stats = len(self.engine.stats)
                if self._stepper is None:  # a virtual clock: steps take no real time
                    updated = self.engine.step()
                else:
                    loop = asyncio.get_running_loop()
                    updated = await loop.run_in_executor(self._stepper, self.engine.step)
                self._after_step(num_stats)
                for seq in updated:
                    out = RequestOutput.from_sequence(seq)
                    if seq.is_finished:
                        self._close(seq.request_id, out)
                    elif seq.request_id in self._streams:
                        self._streams[seq.request_id].queue.put_nowait(out)
                if not self.engine.is_healthy:
                    broken = self.engine.executor.broken
                    raise EngineDeadError(
                        f"the executor cannot run steps any more: {broken}"
                        if broken is not None
                        else f"{self.engine.num_failed_steps} steps in a row failed every request "
                        f"they ran (last error: {self.engine.last_error})"
                    )
                # clients see this step (and send what follows) before the next one runs, and
                # their Python does not contend with the step's
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the step loop broke: no accepted request may hang
            log.exception("engine loop failed")
            self.error = exc
            for rid in list(self._streams):
                self._close(rid, EngineDeadError(f"engine loop failed: {exc}"))
            if self.on_failure is not None:
                self.on_failure(exc)
            raise
