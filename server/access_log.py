"""One INFO line per HTTP request on the ``tfb.access`` logger (off with ``--no-access-log``).

    POST /v1/choices 200 41.3ms items=2 K=10

``items`` (questions, or completions: prompts x n) and ``K`` (weight samples) come from the route
(:func:`note_work`); requests that carry no work (``/health``, ``/metrics``) log ``-``.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tfb.access")


def note_work(request, items: int, samples: int) -> None:
    """Record a request's size for its access log line."""
    request.state.tfb_items, request.state.tfb_samples = items, samples


async def observed(app: ASGIApp, scope: Scope, receive: Receive, send: Send, done) -> None:
    """Run ``app`` on an HTTP request, then ``done(outcome, seconds)``: the outcome is a stream's
    own (its error event's status, or client_closed) over the 200 it started with, else the
    response's status (499, a client gone first, as client_closed)."""
    status, t0 = 500, time.perf_counter()

    async def send_wrapper(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    try:
        await app(scope, receive, send_wrapper)
    finally:
        outcome = scope.get("state", {}).get("tfb_status") or ("client_closed" if status == 499 else status)
        done(outcome, time.perf_counter() - t0)


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        def done(outcome, seconds: float) -> None:
            state = scope.get("state", {})
            log.info("%s %s %s %.1fms items=%s K=%s", scope["method"], scope["path"], outcome, seconds * 1000,
                     state.get("tfb_items", "-"), state.get("tfb_samples", "-"))

        await observed(self.app, scope, receive, send, done)
