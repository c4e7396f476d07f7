"""The engine: owns requests, runs schedule -> execute -> sample -> commit each step."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from modgen import registry
from modgen.config import EngineConfig, typed
from modgen.cpu_tuning import keep_allocations_on_heap
from modgen.engine.clock import Clock
from modgen.engine.executor import Executor, ExecutorContext, step_features
from modgen.engine.kv import KVAllocator
from modgen.engine.probe import StepProbe
from modgen.engine.scheduling import Scheduler, StepPlan
from modgen.engine.sequence import FinishReason, SeqStatus, Sequence
from modgen.model import ModelSpec, describe_model
from modgen.sampling_params import BadRequestError, SamplingParams
from modgen.tokenizer import load_tokenizer, max_token_chars

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one step did (for progress and benchmarks)."""

    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    num_preempted: int
    kv_blocks_used: int
    duration: float
    """Seconds from planning the step to its tokens committed (the executor's clock)."""
    start: float = 0.0
    """When the step began (the executor's clock)."""


class Engine:
    """Continuous-batching engine. Knows no policy (the scheduler decides each step) and no
    model (the executor runs steps, for real or simulated, and owns the clock)."""

    def __init__(
        self,
        spec: ModelSpec,
        kv: KVAllocator,
        scheduler: Scheduler,
        executor: Executor,
        tokenizer: Any | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.spec, self.kv, self.scheduler, self.executor = spec, kv, scheduler, executor
        self.clock: Clock = executor.clock
        self.tokenizer = tokenizer
        self.max_model_len = min(
            self.config.max_model_len or spec.max_position_embeddings,
            spec.max_position_embeddings,
        )
        chars = None if tokenizer is None else max_token_chars(tokenizer)
        self.max_prompt_chars = None if chars is None else chars * self.max_model_len
        """Text prompts longer than this are refused before tokenizing (they cannot fit)."""
        probe = StepProbe(executor, kv, self.clock, self.max_model_len)
        shape = {"model": repr(spec), "executor": executor.describe(),
                 "sliding_window": spec.sliding_window, **probe.shape()}  # fmt: skip
        scheduler.calibrate(probe, shape)
        self.requests: dict[str, Sequence] = {}
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()
        self.stats: list[StepStats] = []
        self.num_failed_steps = 0
        """Steps in a row that failed every request they ran (see ``is_healthy``)."""
        self.last_error: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Engine:
        """Build every component a composed root config names."""
        engine_cfg = typed(EngineConfig, cfg.engine)
        if engine_cfg.num_threads:
            torch.set_num_threads(engine_cfg.num_threads)
        device = _device(engine_cfg.device)
        if device.type == "cpu" and engine_cfg.heap_allocations:
            keep_allocations_on_heap()
        spec = describe_model(cfg.model)
        kv_cfg = registry.to_config("kv_allocator", cfg.kv_allocator)
        num_blocks = kv_cfg.resolve_num_blocks(spec.kv_bytes_per_token())
        kv = registry.build("kv_allocator", kv_cfg, num_blocks)
        kv.namespace = f"{spec!r} seed={cfg.model.get('seed')}"  # what else fixes a block's KV
        sched_node = cfg.scheduler
        if sched_node is None:
            log.info("no scheduler given (+scheduler=NAME); using splitfuse")
            sched_node = {"name": "splitfuse"}
        scheduler = registry.build("scheduler", sched_node, kv)
        ctx = ExecutorContext(
            spec=spec, kv=kv, model=cfg.model, attention=cfg.attention,
            cost_model=cfg.get("cost_model"), device=device, seed=engine_cfg.seed,
            tensor_parallel=engine_cfg.tensor_parallel, tp_timeout_s=engine_cfg.tp_timeout_s,
        )  # fmt: skip
        executor = registry.build("executor", cfg.executor, ctx)
        tokenizer = load_tokenizer(spec.checkpoint)
        log.info(
            "engine: model=%s scheduler=%s kv=%s (%d blocks of %d) executor=%s",
            spec.family, scheduler.registry_name, kv.registry_name, kv.num_blocks,
            kv.block_size, executor.describe(),
        )  # fmt: skip
        return cls(spec, kv, scheduler, executor, tokenizer, engine_cfg)

    # requests --------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: list[int] | str,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> Sequence:
        """Validate and queue a request; BadRequestError names what is wrong.

        ``priority`` (an integer, lower first) is for schedulers that serve by priority
        (``scheduler=splitfuse_priority``); others ignore it. A rejected request changes
        nothing for the others."""
        params = params or SamplingParams()
        params.validate()
        check_priority(priority)
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise BadRequestError(f"request id '{request_id}' is already in use", "request_id")
        seq = self._new_sequence(prompt, params, request_id, next(self._seq_ids), arrival_time)
        seq.priority = priority
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def check_request(
        self, prompt: list[int] | str, params: SamplingParams | None = None
    ) -> list[int]:
        """Validate a request as ``add_request`` would, without queueing it; returns its prompt
        token ids. Reads only immutable state, so a server may call it while a step runs."""
        params = params or SamplingParams()
        params.validate()
        return self._new_sequence(prompt, params, "check", -1, None).prompt_token_ids

    def _new_sequence(
        self,
        prompt: list[int] | str,
        params: SamplingParams,
        request_id: str,
        seq_id: int,
        arrival_time: float | None,
    ) -> Sequence:
        prompt_ids = self._prompt_ids(prompt)
        max_tokens = self._check_params(params, len(prompt_ids))
        seq = Sequence(
            seq_id=seq_id,
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            params=params,
            max_total_tokens=len(prompt_ids) + max_tokens,
            arrival_time=self.clock.now() if arrival_time is None else arrival_time,
        )
        self.scheduler.check(seq)
        return seq

    def _check_params(self, params: SamplingParams, num_prompt_tokens: int) -> int:
        """Check ``params`` against this model; returns the tokens the request may generate."""
        if params.stop and self.tokenizer is None:
            raise BadRequestError("stop strings need a tokenizer; this model has none", "stop")
        return params.check_model(
            self.spec.vocab_size, self.max_model_len, num_prompt_tokens, self.config.cap_max_tokens
        )

    def _prompt_ids(self, prompt: list[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BadRequestError(
                    "text prompts need a tokenizer (tokenizer.json in the checkpoint); "
                    "this model has none: pass token ids",
                    "prompt",
                )
            self.check_prompt_chars(len(prompt))
            prompt = self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise BadRequestError(
                "prompt must be a non-empty string or list of token ids", "prompt"
            )
        vocab = self.spec.vocab_size
        bad = [
            t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
        ]
        if bad:
            raise BadRequestError(
                f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt"
            )
        if len(prompt) >= self.max_model_len:
            raise BadRequestError(
                f"prompt has {len(prompt)} tokens; the model's context is {self.max_model_len} "
                "tokens, which leaves no room to generate",
                "prompt",
            )
        return list(prompt)

    def check_prompt_chars(self, num_chars: int, field: str = "prompt") -> None:
        """Refuse, before tokenizing, a text of ``num_chars`` characters that cannot fit the
        context whatever its tokens (see ``max_prompt_chars``)."""
        if self.max_prompt_chars is not None and num_chars > self.max_prompt_chars:
            raise BadRequestError(
                f"{field} has {num_chars} characters: more tokens than the model's context of "
                f"{self.max_model_len} (at most {self.max_prompt_chars} characters can fit)",
                field,
            )

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its KV at once; False if it is unknown or already done."""
        seq = self.requests.get(str(request_id))
        if seq is None or seq.is_finished:
            return False
        self._finish(seq, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is still waiting or running."""
        return self.scheduler.has_work()

    def release(self, request_id: str) -> None:
        """Forget a finished request (its output has been handed out)."""
        seq = self.requests.get(request_id)
        if seq is not None and seq.is_finished:
            del self.requests[request_id]

    # the step loop ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the executor's processes and process group (tensor parallelism); the engine
        runs no step after it. Exiting the process does the same."""
        self.executor.close()

    @property
    def is_healthy(self) -> bool:
        """False once ``config.max_failed_steps`` steps in a row failed every request they ran
        (the engine itself is broken, not a request): a server should stop and be restarted."""
        if self.executor.broken is not None:
            return False
        return self.num_failed_steps < self.config.max_failed_steps

    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that gained a token or finished.

        Faults stay with their requests: an error in one request's sampling, stop checks or
        detokenizing fails that request alone; an error in the step as a whole (the batched
        forward pass) fails the requests of this step. They end with finish reason ``error``
        naming the cause, their KV is freed, and the engine goes on."""
        t0 = self.clock.now()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler planned an empty step while requests wait")
            return []
        for chunk in plan.chunks:
            if chunk.seq.metrics.first_scheduled_time is None:
                chunk.seq.metrics.first_scheduled_time = t0
        stats = self._step_stats(plan, t0)
        observed = self.scheduler.observes_steps
        features = step_features(plan, self.spec.sliding_window) if observed else None
        done = [c.seq for c in plan.chunks if c.completes]
        try:
            tokens = self.executor.execute(plan, [self._banned(s) for s in done])
        except Exception as exc:
            log.exception("the step failed: failing its %d requests", len(plan))
            ran = [c.seq for c in plan.chunks]
            for seq in ran:
                self._fail(seq, exc)
            self._end_step(stats, self.clock.now() - t0, failed=True)
            return ran
        for chunk in plan.chunks:
            chunk.seq.num_computed += chunk.num_tokens
        self.scheduler.step_done(plan)
        now = self.clock.now()
        for seq, token in zip(done, tokens, strict=True):
            if isinstance(token, Exception):
                self._fail(seq, token)
            else:
                self._commit(seq, token, now)
        num_failed = sum(s.finish_reason is FinishReason.ERROR for s in done)
        self._end_step(stats, self.clock.now() - t0, failed=bool(done) and num_failed == len(done))
        if features is not None:
            self.scheduler.observe(features, stats.duration)
        return done

    def _end_step(self, stats: StepStats, duration: float, failed: bool) -> None:
        stats.duration = duration
        self.stats.append(stats)
        self.num_failed_steps = self.num_failed_steps + 1 if failed else 0

    def _step_stats(self, plan: StepPlan, start: float) -> StepStats:
        return StepStats(
            start=start,
            num_tokens=plan.num_tokens,
            num_prefill_tokens=plan.num_prefill_tokens,
            num_decode_tokens=plan.num_decode_tokens,
            num_seqs=len(plan),
            num_preempted=len(plan.preempted),
            kv_blocks_used=self.kv.num_used_blocks,
            duration=0.0,
        )

    def _stop_ids(self, seq: Sequence) -> list[int]:
        eos = [] if seq.params.ignore_eos else list(self.spec.eos_token_ids)
        return [*eos, *seq.params.stop_token_ids]

    def _banned(self, seq: Sequence) -> list[int]:
        return self._stop_ids(seq) if seq.num_output_tokens < seq.params.min_tokens else []

    def _commit(self, seq: Sequence, token: int, now: float) -> None:
        seq.token_ids.append(token)
        m = seq.metrics
        m.token_times.append(now)
        if m.first_token_time is None:
            m.first_token_time = now
        try:
            reason = self._stop_reason(seq, token)
        except Exception as exc:  # a request that fails here fails alone
            log.exception("request %s failed", seq.request_id)
            self._fail(seq, exc)
            return
        if reason is not None:
            self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if token in self._stop_ids(seq):
            return FinishReason.STOP
        if p.stop and seq.num_output_tokens >= p.min_tokens and self._stop_may_end(seq):
            text = self._detokenize(seq.output_token_ids)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                return FinishReason.STOP
        if seq.num_tokens >= seq.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def _stop_may_end(self, seq: Sequence) -> bool:
        """Whether a stop string may now be in the output: decodes only the last few tokens (a
        new match must end in the newest one), so a long generation is not re-decoded whole at
        every step. The first steps after ``min_tokens`` (when an earlier match starts to count)
        look at the whole output."""
        stops = seq.params.stop
        window = 2 * max(len(s) for s in stops) + 8  # tokens: room for byte pieces and joins
        if seq.num_output_tokens - seq.params.min_tokens <= window:
            return True
        tail = self._detokenize(seq.token_ids[-window:])
        return any(s in tail for s in stops)

    def _detokenize(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._finish(seq, FinishReason.ERROR, error=self.last_error)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.error = reason, error
        seq.metrics.finish_time = self.clock.now()
        self.scheduler.finish(seq)  # frees its KV
        self.executor.release(seq)
        if not seq.text and reason is not FinishReason.ERROR:
            ids = seq.output_token_ids
            if reason is FinishReason.STOP and ids and ids[-1] in self._stop_ids(seq):
                ids = ids[:-1]
            try:
                seq.text = self._detokenize(ids)
            except Exception as exc:  # the request fails, alone; its KV is already free
                log.exception("request %s failed", seq.request_id)
                self.last_error = seq.error = f"{type(exc).__name__}: {exc}"
                seq.finish_reason = FinishReason.ERROR


def check_priority(priority: object) -> None:
    """Raise BadRequestError unless ``priority`` is an integer (not a bool)."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise BadRequestError(
            f"priority must be an integer (lower is served first), got {priority!r}"[:120],
            "priority",
        )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
