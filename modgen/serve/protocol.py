"""The OpenAI-compatible wire format: validated request models and response/error bodies.

Requests are strict: a field of the wrong type, an unknown field or a parameter this server does
not support is refused with an OpenAI-style error naming the field, never silently ignored.
The models check types; values are checked by SamplingParams and the engine (which know the
model's vocabulary and context), and the ranges they enforce are written into the JSON schema
(``_doc``) for the OpenAPI description.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from modgen.sampling_params import MAX_SEED, BadRequestError, SamplingParams

MAX_N = 128


def _doc(**schema: Any) -> Any:
    """JSON-schema keywords for the OpenAPI description only (not checked by pydantic)."""
    return Field(json_schema_extra=schema)


TokenId = Annotated[int, _doc(minimum=0, **{"x-token-id": True})]  # the server adds maximum
TokenIds = Annotated[list[TokenId], _doc(minItems=1)]
Text = Annotated[str, _doc(minLength=1)]
# known OpenAI fields this server does not implement take only their neutral values
Zero = Annotated[float, _doc(const=0)]
NEUTRAL = (None, 0, 0.0, False, {}, [])
Neutral = Annotated[Any, WithJsonSchema({"enum": [None, False, 0, {}, []]})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """``stream_options``: whether a last chunk carries the usage."""

    include_usage: bool | None = False


class GenerationRequest(_Strict):
    """Fields shared by completions and chat completions (OpenAI names, plus vLLM-style
    ``top_k``, ``min_tokens``, ``ignore_eos`` and ``stop_token_ids``)."""

    model: str
    max_tokens: Annotated[int, _doc(minimum=1)] | None = None
    min_tokens: Annotated[int, _doc(minimum=0)] | None = None
    temperature: Annotated[float, _doc(minimum=0)] | None = None
    top_p: Annotated[float, _doc(exclusiveMinimum=0, maximum=1)] | None = None
    top_k: Annotated[int, _doc(minimum=-1)] | None = None
    seed: Annotated[int, _doc(minimum=0, maximum=MAX_SEED - 1)] | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    n: Annotated[int, _doc(minimum=1, maximum=MAX_N)] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int | None = None
    """vLLM's request priority: lower is served first by schedulers that serve by priority
    (``scheduler=splitfuse_priority``); others ignore it. Default 0."""
    # known OpenAI fields this server does not implement: only their neutral values pass
    presence_penalty: Zero | None = None
    frequency_penalty: Zero | None = None
    logit_bias: Annotated[dict[str, float], _doc(maxProperties=0)] | None = None
    logprobs: Neutral = None

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
            if value not in NEUTRAL:
                raise BadRequestError(f"{name} is not supported by this server", name)

    def sampling_params(self, max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        """The engine's parameters for one choice; a valid ``seed`` + ``seed_offset`` wraps
        around within the valid range (BadRequestError names a bad value)."""
        stop = self.stop if self.stop is not None else []
        seed = self.seed
        if seed is not None and 0 <= seed < MAX_SEED:
            seed = (seed + seed_offset) % MAX_SEED
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            seed=seed,
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
        )

    def in_own_terms(self, exc: BadRequestError) -> BadRequestError:
        """``exc`` (from SamplingParams or the engine) naming this request's own field."""
        return exc

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is text, token ids, or a list of either."""

    prompt: Text | TokenIds | Annotated[list[Text | TokenIds], _doc(minItems=1)]
    echo: Annotated[bool, _doc(const=False)] | None = None
    best_of: Annotated[int, _doc(minimum=1, maximum=MAX_N)] | None = None
    suffix: Annotated[str | None, WithJsonSchema({"type": "null"})] = None

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


TEXT_FORMAT = {
    "type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
    "additionalProperties": False,
}  # fmt: skip


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], _doc(minItems=1)]
    max_completion_tokens: Annotated[int, _doc(minimum=1)] | None = None
    top_logprobs: Annotated[int, _doc(const=0)] | None = None
    response_format: Annotated[dict[str, Any], WithJsonSchema(TEXT_FORMAT)] | None = None
    tools: Annotated[list[Any], _doc(maxItems=0)] | None = None
    tool_choice: Neutral = None
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

    def in_own_terms(self, exc: BadRequestError) -> BadRequestError:
        """The prompt is the rendered ``messages``; ``max_tokens`` may be spelt
        ``max_completion_tokens``."""
        if exc.field == "prompt":
            return BadRequestError(
                f"messages (as the chat template renders them): {exc}", "messages"
            )
        if exc.field == "max_tokens" and self.max_completion_tokens is not None:
            name = "max_completion_tokens"
            return BadRequestError(str(exc).replace("max_tokens", name), name)
        return exc


# parsing ---------------------------------------------------------------------------------------

_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\]]|^[A-Z]")
_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
               "dict": "object", "none": "null"}  # fmt: skip


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
    if errors[0]["type"] == "json_invalid":
        return BadRequestError(f"malformed JSON body: {errors[0]['msg']}", None)
    first, alternatives = _follow_unions(errors)
    path = [str(p) for p in first["loc"]]
    if not path:
        return BadRequestError(f"the request body must be a JSON object: {first['msg']}", None)
    field, where = path[0], ".".join(path)
    shown = f"{first.get('input')!r}"[:80]
    if alternatives:
        expected = ", ".join(_type_name(t) for t in alternatives)
        return BadRequestError(
            f"invalid type for '{where}' ({shown}): expected one of {expected}", field
        )
    if first["type"] == "extra_forbidden":
        return BadRequestError(f"Unrecognized request argument supplied: {where}", field)
    if first["type"] == "missing":
        return BadRequestError(f"missing required field '{where}'", field)
    return BadRequestError(f"invalid value for '{where}' ({shown}): {first['msg']}", field)


def _follow_unions(errors: list[Any]) -> tuple[dict[str, Any], list[str]]:
    """The error to report, its location stripped of pydantic's union tags (``str``,
    ``list[int]``...). Where a value failed every branch of a union, the branch it came closest
    to (the only one whose errors lie deeper) is followed; if there is none such, the error is
    the union's and the second result lists the branches (types) it expected."""
    first = errors[0]
    loc, i = list(first["loc"]), 0
    while i < len(loc):
        if not (isinstance(loc[i], str) and _UNION_TAG.search(loc[i])):
            i += 1
            continue
        same = [e for e in errors if list(e["loc"][:i]) == loc[:i] and len(e["loc"]) > i]
        tags = list(dict.fromkeys(e["loc"][i] for e in same))
        deeper = list(dict.fromkeys(e["loc"][i] for e in same if len(e["loc"]) > i + 1))
        if len(tags) == 1:  # a union has two branches or more: this is a key like "X"
            i += 1
            continue
        if len(deeper) != 1:
            return {**first, "loc": tuple(loc[:i])}, tags
        tag = deeper[0]
        errors = [
            {**e, "loc": (*e["loc"][:i], *e["loc"][i + 1 :])} for e in same if e["loc"][i] == tag
        ]
        first = errors[0]
        loc = list(first["loc"])
    return first, []


def _type_name(tag: str) -> str:
    """A pydantic type tag in JSON's words: ``list[union[str,list[int]]]`` -> ``array of
    (string | array of integer)``."""
    head, _, rest = tag.partition("[")
    if not rest:
        return _JSON_TYPES.get(head, head)
    args, depth, start = [], 0, 0
    for i, ch in enumerate(rest[:-1]):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            args.append(rest[start:i])
            start = i + 1
    names = [_type_name(a) for a in [*args, rest[start:-1]]]
    if head == "union":
        return "(" + " | ".join(names) + ")"
    if head == "list":
        return f"array of {names[0]}"
    return _JSON_TYPES.get(head, head)


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
