"""Persistent serving: an OpenAI-compatible HTTP server (``task=serve``) over the AsyncEngine,
with Prometheus metrics, API keys, graceful shutdown, and replicas behind a load balancer.

Modules: ``task`` (the config and entry), ``app`` + ``openai_routes`` (the FastAPI app),
``protocol`` (request validation, response bodies), ``generation`` (a request's choices and
incremental text), ``metrics``, ``server`` (uvicorn), ``worker`` (one engine process),
``replicas`` + ``balancer`` (N engine processes behind a least-outstanding-work proxy).
"""
