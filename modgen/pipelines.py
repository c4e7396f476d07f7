"""The non-persistent pipeline (as ``mii.pipeline``): build an engine in this process, call it
with prompts and generation parameters, get responses.

>>> pipe = modgen.pipeline("mistral", checkpoint="/path/to/hf_dir")
>>> pipe(["DeepSpeed is", "Seattle is"], max_new_tokens=32, do_sample=False)[0].generated_text
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modgen.llm import LLM
from modgen.sampling_params import SamplingParams

# MII's argument names -> SamplingParams fields
_ALIASES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass
class Response:
    """One prompt's result."""

    generated_text: str
    """The generated text (after the prompt's text with ``return_full_text=True``)."""
    prompt_length: int
    """Prompt tokens."""
    generated_length: int
    """Generated tokens."""
    finish_reason: str
    """``stop`` (EOS, a stop token or string) or ``length``."""
    token_ids: list[int]
    """The generated token ids."""

    def __str__(self) -> str:
        return self.generated_text


class Pipeline:
    """Generates for a batch of prompts per call; the engine lives as long as the pipeline."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer, or None."""
        return self.llm.tokenizer

    def __call__(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        *,
        do_sample: bool = True,
        return_full_text: bool = False,
        **params: Any,
    ) -> list[Response]:
        """Generate for ``prompts`` (text or token ids; one or a list). Parameters are
        SamplingParams fields or MII's names (``max_new_tokens``, ``min_new_tokens``);
        ``do_sample=False`` is greedy. Unknown names raise TypeError naming them."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        sp = self.sampling_params(do_sample, params)
        outs = self.llm.generate(list(prompts), sp)  # type: ignore[arg-type]
        return [
            Response(
                generated_text=(p if return_full_text and isinstance(p, str) else "") + o.text,
                prompt_length=len(o.prompt_token_ids),
                generated_length=len(o.token_ids),
                finish_reason=o.finish_reason or "",
                token_ids=o.token_ids,
            )
            for p, o in zip(prompts, outs, strict=True)
        ]

    @staticmethod
    def sampling_params(do_sample: bool, params: dict[str, Any]) -> SamplingParams:
        """SamplingParams from keyword arguments (MII names accepted)."""
        kwargs = {_ALIASES.get(k, k): v for k, v in params.items()}
        unknown = sorted(set(kwargs) - _FIELDS)
        if unknown:
            known = ", ".join(sorted(_FIELDS | set(_ALIASES) | {"do_sample", "return_full_text"}))
            raise TypeError(f"unknown generation parameter(s) {unknown}; known: {known}")
        if not do_sample:
            kwargs["temperature"] = 0.0
        return SamplingParams(**kwargs)


def pipeline(
    model: str = "mistral", checkpoint: str | None = None, overrides: Sequence[str] = ()
) -> Pipeline:
    """A pipeline over an engine composed like ``LLM`` (model preset, checkpoint, overrides)."""
    return Pipeline(LLM(model, checkpoint=checkpoint, overrides=overrides))
