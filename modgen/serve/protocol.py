"""The OpenAI-compatible wire format: validated request models and response/error bodies.

Requests are strict: a field of the wrong type, an unknown field or a parameter this server does
not support is refused with an OpenAI-style error naming the field, never silently ignored.
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from modgen.sampling_params import BadRequestError, SamplingParams

MAX_N = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """``stream_options``: whether a last chunk carries the usage."""

    include_usage: bool | None = False


class GenerationRequest(_Strict):
    """Fields shared by completions and chat completions (OpenAI names, plus vLLM-style
    ``top_k``, ``min_tokens``, ``ignore_eos`` and ``stop_token_ids``)."""

    model: str
    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = None
    ignore_eos: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # known OpenAI fields this server does not implement: only their neutral values pass
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
    )

    @property
    def num_choices(self) -> int:
        """``n``, checked."""
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_N:
            raise BadRequestError(f"n must be an integer in [1, {MAX_N}], got {n}", "n")
        return n

    def check_supported(self) -> None:
        """Raise BadRequestError for a known OpenAI parameter set to a value this server does
        not implement."""
        for name in self.UNSUPPORTED:
            value = getattr(self, name)
            if value not in (None, 0, 0.0, False, {}, []):
                raise BadRequestError(f"{name} is not supported by this server", name)

    def sampling_params(self, max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        """The engine's parameters for one choice; ``seed`` + ``seed_offset`` when seeded."""
        stop = self.stop if self.stop is not None else []
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
        )

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is text, token ids, or a list of either."""

    prompt: str | list[int] | list[str | list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (*GenerationRequest.UNSUPPORTED, "echo", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per batch entry."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise BadRequestError("prompt must not be empty", "prompt")
        return list(p)

    def check_supported(self) -> None:
        """As the base class; ``best_of`` may only equal ``n``."""
        super().check_supported()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise BadRequestError("best_of other than n is not supported", "best_of")


class TextPart(_Strict):
    """One part of a message's content; only text is supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        *GenerationRequest.UNSUPPORTED,
        "top_logprobs",
        "tools",
        "tool_choice",
    )

    def check_supported(self) -> None:
        """As the base class; ``response_format`` may only ask for text."""
        super().check_supported()
        if self.response_format not in (None, {"type": "text"}):
            raise BadRequestError(
                "response_format other than text is not supported", "response_format"
            )
        if not self.messages:
            raise BadRequestError("messages must not be empty", "messages")


# parsing ---------------------------------------------------------------------------------------

_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\]]|^[A-Z]")


def parse_request(model: type[GenerationRequest], body: bytes) -> GenerationRequest:
    """Validate a JSON body; BadRequestError names the first bad field."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as exc:
        raise _bad_request(exc) from None
    req.check_supported()
    return req


def _bad_request(exc: ValidationError) -> BadRequestError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        return BadRequestError(f"malformed JSON body: {first['msg']}", None)
    path = [str(p) for p in first["loc"] if not (isinstance(p, str) and _UNION_TAG.search(p))]
    if not path:
        return BadRequestError(f"the request body must be a JSON object: {first['msg']}", None)
    field = path[0]
    where = ".".join(path)
    if kind == "extra_forbidden":
        return BadRequestError(f"Unrecognized request argument supplied: {where}", field)
    if kind == "missing":
        return BadRequestError(f"missing required field '{where}'", field)
    same = [e for e in errors if e["loc"] and str(e["loc"][0]) == field]
    if len(same) > 1 and len({len(e["loc"]) for e in same}) == 1:
        allowed = ", ".join(str(e["loc"][1]) for e in same if len(e["loc"]) > 1)
        return BadRequestError(f"invalid type for '{where}': expected one of {allowed}", field)
    value = first.get("input")
    shown = f"{value!r}"[:80]
    return BadRequestError(f"invalid value for '{where}' ({shown}): {first['msg']}", field)


# responses -------------------------------------------------------------------------------------


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Token counts of one response."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(
    rid: str, obj: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None
) -> dict[str, Any]:
    """A completion(-chunk) or chat completion(-chunk) body."""
    body: dict[str, Any] = {
        "id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
    }  # fmt: skip
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    """A choice of ``text_completion`` (whole or a streamed delta)."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    """A choice of a whole ``chat.completion``."""
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def chat_delta(
    index: int, text: str | None, finish_reason: str | None, role: bool = False
) -> dict[str, Any]:
    """A choice of a ``chat.completion.chunk``."""
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
