"""The offline Python API: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from modgen.config import compose_config
from modgen.engine import Engine
from modgen.outputs import RequestOutput
from modgen.sampling_params import BadRequestError, SamplingParams


class LLM:
    """An engine composed from the same configs and override strings as the CLI.

    >>> llm = LLM("mistral", checkpoint="/path/to/hf_dir", overrides=["+scheduler=splitfuse"])
    >>> outs = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0.0))
    """

    def __init__(
        self, model: str = "mistral", checkpoint: str | None = None, overrides: Sequence[str] = ()
    ) -> None:
        extra = [] if checkpoint is None else [f"model.checkpoint={checkpoint}"]
        self.config = compose_config([f"model={model}", *extra, *overrides])
        self.engine = Engine.from_config(self.config)

    def close(self) -> None:
        """Stop the engine's other ranks, if it has any (``engine.tensor_parallel`` > 1)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, or None."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Sequence[list[int] | str] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.
        ``priority`` gives each prompt's priority (lower first; schedulers that serve by
        priority use it, e.g. ``+scheduler=splitfuse_priority``).

        A bad prompt or parameter raises BadRequestError naming its index before anything runs.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(priority)} priorities")
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                seqs.append(self.engine.add_request(prompt, p, priority=priority[i]))
            except BadRequestError as exc:
                for seq in seqs:
                    self.engine.abort(seq.request_id)
                    self.engine.release(seq.request_id)
                raise BadRequestError(f"prompt {i}: {exc}", exc.field) from exc
        with tqdm(total=len(seqs), desc="requests", disable=not use_tqdm) as bar:
            while not all(s.is_finished for s in seqs):
                bar.update(sum(s.is_finished for s in self.engine.step()))
        outputs = [RequestOutput.from_sequence(s) for s in seqs]
        for seq in seqs:
            self.engine.release(seq.request_id)
        return outputs
