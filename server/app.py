"""The app factory: ``build_app(settings)``.

The model loads (or the start-up search runs) in the engine process, or in a background thread,
so ``/health`` answers 503 meanwhile; then the engine serves and ``/health`` answers 200.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tfb_core import DEMO_MODEL

from . import loader
from .access_log import AccessLogMiddleware, observed
from .errors import APIError, error_body, install_error_handlers, public_error
from .limits import Tokenizing
from .metrics import Metrics
from .routes import api, check_api_key, health
from .engine.client import EngineClient, make_client
from .generating import ChatServing, CompletionServing
from .serving import ChoicesServing
from .settings import Settings
from .state import AppState
from .tokenizer_api import TokenizerServing

log = logging.getLogger(__name__)


def build_app(settings: Settings | None = None,
              load: Callable[[Settings, Callable[[str], None]], loader.Loaded] = loader.load,
              runner: Callable | None = None) -> FastAPI:
    """The FastAPI app serving ``settings`` (default: read from ``TFB_*`` now).

    ``load`` loads the posterior (each Ray Serve replica passes its own); ``runner(loaded, metrics,
    engine kind)`` makes the engine's :class:`~server.engine.core.ModelRunner`: the seam through
    which tests inject faults into the model's forwards and decode steps (tests/server_helpers.py,
    ``FaultyRunner``). Either runs the engine in this process."""
    settings = settings or Settings()
    separate = in_engine_process(settings, load, runner)
    model_id = loader.model_id(settings)
    state = AppState(settings=settings, metrics=Metrics(model_id), model_id=model_id,
                     base_name=settings.model or DEMO_MODEL)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start_loading(state, load, separate, runner)
        yield
        await state.engine.stop()
        if state.model is not None:
            log.info("drained: %s", drained_gauges(state.metrics))

    app = FastAPI(title="tfb", version="0.1.0", lifespan=lifespan,
                  description="LLM answers with honest uncertainty: a LoRA adapter Bayesianized "
                  "without training (TFB), averaged over K weight samples.")
    app.state.tfb = state
    install_error_handlers(app)
    app.include_router(health)
    app.include_router(api)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # the key is checked before the body is read: 401 (not 400 or 413) without it, on every path
    # but /health, the OpenAPI schema and its pages included
    app.add_middleware(AuthMiddleware, key=settings.api_key, open_paths={r.path for r in health.routes})
    app.add_middleware(MetricsMiddleware, metrics=state.metrics,
                       known_paths={r.path for r in [*health.routes, *api.routes]}
                       | {"/openapi.json", "/docs", "/redoc"})
    app.add_middleware(ServerTimingMiddleware)
    if settings.access_log:
        app.add_middleware(AccessLogMiddleware)
    return app


def drained_gauges(metrics: Metrics) -> str:
    """The work gauges as the server exits ("0 running, 0 queued, 0 KV rows" after a clean drain)."""
    def value(name: str) -> int:
        return int(metrics.registry.get_sample_value(name, {"model": metrics.model}) or 0)

    return (f"{value('tfb_requests_running')} running, {value('tfb_queue_depth')} queued, "
            f"{value('tfb_kv_cache_rows')} KV rows")


def in_engine_process(settings: Settings, load, runner=None) -> bool:
    """Whether the engine runs in a process of its own: ``settings.engine_process`` (the
    default), unless the caller loads the model itself (``build_app(settings, load)``, as each
    Ray Serve replica does) or makes its runner, which only this process can run."""
    if load is loader.load and runner is None:
        return settings.engine_process
    if settings.engine_process and settings.given("engine_process"):
        raise ValueError("engine_process: the engine process loads the model with server.loader.load; "
                         "a load function of this process's cannot run there")
    return False


def start_loading(state: AppState, load, separate: bool, runner=None) -> None:
    """Start the engine: in a process of its own if ``separate``, else in this process, loading in
    a daemon thread; once it serves, the API serves its model (:func:`ready`)."""
    import torch

    # this process tokenizes and streams; its engine process does the math
    torch.set_num_threads(1 if separate else state.settings.torch_threads)
    client = state.engine = make_client(state.settings, state.metrics, load, separate, runner)

    def on_ready(model, settings) -> None:
        state.settings = settings
        ready(state, model, client)

    def on_failed(reason: str) -> None:
        fail(state, reason, "start-up" if state.status in ("loading", "searching") else "serving")

    def on_status(status: str) -> None:
        state.status = status

    asyncio.get_running_loop().create_task(client.start(on_ready, on_failed, on_status), name="tfb-engine-start")


def ready(state: AppState, model: loader.ServedModel, engine: EngineClient) -> None:
    """Serve ``model`` through ``engine``."""
    s = state.settings
    state.model = model
    tokenizing = Tokenizing()  # the one thread that uses the event loop's tokenizer
    state.choices = ChoicesServing(model, engine, s, state.metrics, tokenizing)
    state.completions, state.chat = (cls(model, engine, s, state.metrics, tokenizing)
                                     for cls in (CompletionServing, ChatServing))
    state.tokenizer = TokenizerServing(model, tokenizing)
    state.metrics.set_posterior(model.sigma, s.samples, {
        "base_model": loader.public_name(model.base_name, s.show_paths),
        "adapter": loader.public_name(model.adapter, s.show_paths) or "", "source": model.source,
        "device": model.device, "dtype": model.dtype,
    })
    if state.status != "draining":
        state.status = "ready"
    log.info("ready: %s (sigma=%.6g, K=%d, %s) on http://%s:%d", model.model_id, model.sigma, s.samples,
             model.source, s.host, s.port)
    if state.on_ready is not None:
        state.on_ready()


def fail(state: AppState, reason: str, when: str = "start-up") -> None:
    state.status, state.detail = "failed", reason
    log.error("%s failed: %s", when, reason)
    if state.on_fatal is not None:
        state.on_fatal(reason)


class MetricsMiddleware:
    """Counts and times every HTTP request by endpoint (the route's path) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: set[str]):
        self.app, self.metrics, self.known_paths = app, metrics, known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        def done(outcome, seconds: float) -> None:
            # the route's path template; unknown paths share one label (bounded cardinality)
            endpoint = getattr(scope.get("route"), "path", None) or scope["path"]
            self.metrics.observe_request(endpoint if endpoint in self.known_paths else "other", outcome, seconds)

        await observed(self.app, scope, receive, send, done)


class ServerTimingMiddleware:
    """``Server-Timing: app;dur=MS`` on each response the app makes: the milliseconds from the
    request reaching the app (reading its body included) to its response starting (a stream:
    its headers), so a client can tell the server's time from the network's and its own
    (browsers' developer tools show it)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                timing = f"app;dur={(time.perf_counter() - t0) * 1000:.2f}".encode()
                message = {**message, "headers": [*message.get("headers", ()), (b"server-timing", timing)]}
            await send(message)

        await self.app(scope, receive, send_timed)


class AuthMiddleware:
    """With ``--api-key``: 401 before anything else for every path but ``open_paths``."""

    def __init__(self, app: ASGIApp, key: str | None, open_paths: set[str]):
        self.app, self.key, self.open_paths = app, key, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.key is None or scope["type"] != "http" or scope["method"] == "OPTIONS"
                or scope["path"] in self.open_paths):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        try:
            check_api_key(self.key, headers.get(b"authorization", b"").decode("latin-1"))
        except APIError as e:
            from fastapi.responses import JSONResponse

            status, body, extra = public_error(e)
            return await JSONResponse(body, status_code=status, headers=extra)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes`` (by Content-Length, or counted while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # read it all (bounded), then replay it to the app
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        from fastapi.responses import JSONResponse

        response = JSONResponse(error_body(413, f"the request body is larger than {self.max_bytes} bytes "
                                           f"(the server's --max-body-bytes)", "invalid_request_error",
                                           code="body_too_large"), status_code=413)
        await response(scope, receive, send)
