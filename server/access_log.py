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


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, t0 = 500, time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state = scope.get("state", {})
            outcome = state.get("tfb_status") or status  # a stream's own outcome wins over its 200
            log.info("%s %s %s %.1fms items=%s K=%s", scope["method"], scope["path"], outcome,
                     (time.perf_counter() - t0) * 1000, state.get("tfb_items", "-"), state.get("tfb_samples", "-"))
