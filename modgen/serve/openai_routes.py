"""``POST /v1/completions`` and ``POST /v1/chat/completions``: parse, validate, run the choices
on the engine, answer whole or as server-sent events. Parsing, chat templating and tokenizing
run in the server's worker thread (``ServerState.off_loop``), never on the event loop."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from modgen.engine.engine import check_priority
from modgen.sampling_params import BadRequestError, SamplingParams
from modgen.serve import protocol as p
from modgen.serve.generation import Choice, Generation, TextStream
from modgen.serve.openapi import generation
from modgen.serve.web import (
    SSE_DONE,
    APIError,
    ClosingStreamingResponse,
    check_output,
    sse,
    to_api_error,
    unless_disconnected,
)

if TYPE_CHECKING:
    from modgen.serve.app import ServerState

router = APIRouter()
ParamsFor = Callable[[int], SamplingParams]  # choice j of a prompt -> its parameters


@router.post("/completions", **generation(p.CompletionRequest))
async def completions(request: Request) -> Response:
    """OpenAI completions: ``prompt`` as text, token ids or a batch of either."""
    st = _state(request)
    req, choices = await st.off_loop(_prepare_completion, st, await request.body())
    return await _respond(st, request, req, choices, chat=False)


@router.post("/chat/completions", **generation(p.ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions; the prompt is the chat template applied to ``messages``."""
    st = _state(request)
    req, choices = await st.off_loop(_prepare_chat, st, await request.body())
    return await _respond(st, request, req, choices, chat=True)


def _prepare_completion(st: ServerState, body: bytes) -> tuple[p.GenerationRequest, list[Choice]]:
    req = p.parse_request(p.CompletionRequest, body)
    assert isinstance(req, p.CompletionRequest)
    _check_model(st, req.model)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    return req, _choices(st, req, req.prompts(), lambda j: req.sampling_params(max_tokens, j))


def _prepare_chat(st: ServerState, body: bytes) -> tuple[p.GenerationRequest, list[Choice]]:
    req = p.parse_request(p.ChatCompletionRequest, body)
    assert isinstance(req, p.ChatCompletionRequest)
    _check_model(st, req.model)
    ids = _render_chat(st, req)
    max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = req.max_tokens
    if max_tokens is None:  # what is left of the context, or the server's default
        room = min(st.engine.max_model_len, st.engine.kv.capacity_tokens) - len(ids)
        max_tokens = max(1, min(room, st.config.default_max_tokens or room))
    return req, _choices(st, req, [ids], lambda j: req.sampling_params(max_tokens, j))


def _state(request: Request) -> ServerState:
    return request.app.state.modgen


def _check_model(st: ServerState, model: str) -> None:
    if model != st.model_name:
        raise APIError(
            404, f"the model '{model}' does not exist; this server serves '{st.model_name}'",
            param="model", code="model_not_found",
        )  # fmt: skip


def _render_chat(st: ServerState, req: p.ChatCompletionRequest) -> list[int]:
    tok = st.engine.tokenizer
    template = st.config.chat_template or getattr(tok, "chat_template", None)
    if tok is None or not template:
        raise BadRequestError(
            "this model has no chat template: start the server with serve.chat_template=... "
            "(a Jinja template over `messages`) or use /v1/completions",
            "messages",
        )
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    st.engine.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
    try:
        text = tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # a template error is the request's (e.g. roles it refuses)
        raise BadRequestError(
            f"the chat template failed on these messages: {exc}", "messages"
        ) from exc
    return tok.encode(text, add_special_tokens=False)


def _choices(
    st: ServerState, req: p.GenerationRequest, prompts: list[str | list[int]], params_for: ParamsFor
) -> list[Choice]:
    """Validate every prompt with its parameters (as the engine will) and make n choices each;
    a BadRequestError names the request's own field."""
    try:
        priority = req.priority or 0
        check_priority(priority)
        return _make_choices(st, prompts, req.num_choices, params_for, priority)
    except BadRequestError as exc:
        raise req.in_own_terms(exc) from None


def _make_choices(
    st: ServerState, prompts: list[str | list[int]], n: int, params_for: ParamsFor,
    priority: int = 0,
) -> list[Choice]:  # fmt: skip
    limit = st.config.max_queued
    if limit is not None and n * len(prompts) > limit:
        raise BadRequestError(
            f"{len(prompts)} prompt(s) x n={n} choices exceed the server's limit of {limit} "
            "requests at once",
            "n" if len(prompts) <= limit else "prompt",
        )
    out = []
    first = params_for(0)
    for i, prompt in enumerate(prompts):
        try:
            ids = st.engine.check_request(prompt, first)
        except BadRequestError as exc:
            where = f"prompt {i}: " if len(prompts) > 1 else ""
            raise BadRequestError(f"{where}{exc}", exc.field) from None
        for j in range(n):
            params = first if j == 0 else params_for(j)
            text = TextStream(st.engine.tokenizer, params.stop)
            out.append(Choice(i * n + j, i, ids, params, text, priority))
    return out


async def _respond(
    st: ServerState, request: Request, req: p.GenerationRequest, choices: list[Choice], chat: bool
) -> Response:
    assert st.aengine is not None
    gen = Generation(st.aengine, choices)
    gen.submit()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if req.stream:
        events = _events(gen, rid, req.model, chat, req.include_usage)
        return ClosingStreamingResponse(events, on_close=gen.abort, media_type="text/event-stream")
    outs = await unless_disconnected(request, gen.collect())
    if outs is None:  # the client went away: everything was aborted
        return Response(status_code=499)
    for out in outs:
        check_output(out)
    make = p.chat_choice if chat else p.completion_choice
    body = p.response(
        rid, "chat.completion" if chat else "text_completion", req.model,
        [make(c.index, o.text, o.finish_reason) for c, o in zip(choices, outs, strict=True)],
        p.usage(gen.num_prompt_tokens(), gen.num_output_tokens()),
    )  # fmt: skip
    return JSONResponse(body)


async def _events(
    gen: Generation, rid: str, model: str, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """The server-sent events of a streamed response; a failure ends it with an error event."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> str:
        return sse(p.response(rid, obj, model, choices, use))

    try:
        if chat:
            yield chunk([p.chat_delta(c.index, "", None, role=True) for c in gen.choices])
        async for choice, out in gen.stream():
            check_output(out)
            text, reason = choice.text.delta(out), out.finish_reason
            if chat:
                if text:
                    yield chunk([p.chat_delta(choice.index, text, None)])
                if reason:
                    yield chunk([p.chat_delta(choice.index, None, reason)])
            else:  # one event per token, even one without text of its own (for token timing)
                yield chunk([p.completion_choice(choice.index, text, reason)])
        if include_usage:
            yield chunk([], p.usage(gen.num_prompt_tokens(), gen.num_output_tokens()))
    except Exception as exc:  # headers are sent: the error travels as an event
        yield sse(to_api_error(exc).body)
    yield SSE_DONE
