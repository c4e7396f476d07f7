"""The server's OpenAPI description. The generation routes parse their bodies themselves (to
word their own errors), so FastAPI cannot see the request models: this module declares them,
with every error status and the content type of every answer."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    """What went wrong; ``param`` names the offending request field, when there is one."""

    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """An OpenAI-style error body."""

    error: ErrorDetail


ERRORS = {
    400: "Bad request: ``error.param`` names the field",
    401: "Missing or wrong API key (when the server has keys)",
    404: "No such model",
    408: "The request body was not received in time",
    413: "The request body is too large",
    429: "Too many unfinished requests: retry later (``Retry-After``)",
    500: "The request failed inside the engine",
    503: "The engine is shutting down or has failed",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Response declarations of these error statuses."""
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


def generation(model: type[BaseModel]) -> dict[str, Any]:
    """Route arguments of a generation endpoint whose JSON body is ``model``: whole answers are
    JSON, streamed ones server-sent events."""
    body = {"$ref": REF.format(model=model.__name__)}
    ok = {
        "description": "The completion, or its chunks as server-sent events when `stream`",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
    return {
        "openapi_extra": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}}
        },
        "responses": {200: ok, **errors(400, 401, 404, 408, 413, 429, 500, 503)},
    }


def install(app: FastAPI, models: list[type[BaseModel]], model_name: str, vocab_size: int) -> None:
    """Make ``app``'s OpenAPI description carry the JSON schemas of ``models``, with what this
    server accepts: ``model`` is ``model_name``; token ids (``x-token-id``) are below
    ``vocab_size``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in defs.get("$defs", {}).items():
                if name in {m.__name__ for m in models}:
                    schema["properties"]["model"] = {"type": "string", "enum": [model_name]}
                schemas[name] = _bound_token_ids(schema, vocab_size)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _bound_token_ids(node: Any, vocab_size: int) -> Any:
    if isinstance(node, dict):
        if node.pop("x-token-id", False):
            node["maximum"] = vocab_size - 1
        return {k: _bound_token_ids(v, vocab_size) for k, v in node.items()}
    if isinstance(node, list):
        return [_bound_token_ids(v, vocab_size) for v in node]
    return node
