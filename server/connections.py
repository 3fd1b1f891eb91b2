"""Connections: no client holds the server by sending slowly, by not reading, or by their number.

``tfb serve`` runs uvicorn's HTTP protocol (httptools, else h11) with three guards
(:func:`uvicorn_config`), and raises the open-file limit at start-up (:func:`raise_open_file_limit`):

- **Read deadline.** A request's head and body must arrive within ``--read-timeout`` seconds
  of the connection's start, or of the previous response on a kept-alive connection, else
  the client gets 408 and the connection is closed. (uvicorn closes idle kept-alive
  connections after 5 s, but waits forever for a request in progress.)
- **Stalled clients.** A response whose client has not read for ``--stream-stall-timeout``
  seconds (the connection's buffers stayed full) is cut: the connection is aborted, the app
  sees the client gone (a stream's work is dropped and its KV rows freed at the next step),
  and the request is counted as ``tfb_requests_total{status="stalled"}``.
- **Connections near the open-file limit.** When connections reach :func:`max_connections`
  (the open-file limit less a reserve for the server's own files), each new one closes the
  oldest connection still sending its request (503), so the server never runs out of file
  descriptors to accept ``/health`` and well-behaved clients with.

This reaches into uvicorn's protocol classes (``cycle``, ``on_response_complete``); the tests in
tests/test_reliability.py hold it to its behaviour.
"""

from __future__ import annotations

import json
import logging
import resource

import uvicorn

log = logging.getLogger(__name__)
STALLED = "stalled"  # the request's status in the metrics (server.access_log.observed reads it)

try:
    import httptools  # noqa: F401  (uvicorn's auto choice)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as BaseProtocol
except ImportError:  # pragma: no cover
    from uvicorn.protocols.http.h11_impl import H11Protocol as BaseProtocol


class Guards:
    """One server's limits, and its connections still sending a request (oldest first)."""

    def __init__(self, read_timeout: float, stall_timeout: float, max_connections: int):
        self.read_timeout, self.stall_timeout, self.max_connections = read_timeout, stall_timeout, max_connections
        self.reading: dict[GuardedProtocol, None] = {}  # insertion-ordered: the oldest first

    def evict_oldest(self, newcomer: "GuardedProtocol") -> None:
        oldest = next((p for p in self.reading if p is not newcomer), None)
        if oldest is not None:
            oldest.refuse(503, "too_many_connections", "the server is at its connection limit and this "
                          "request had not arrived in full; retry", {"Retry-After": "1"})


class GuardedProtocol(BaseProtocol):
    """uvicorn's HTTP protocol with a read deadline per request, a stall timeout per response,
    and a connection cap (:class:`Guards`, a class attribute set by :func:`guarded_protocol`)."""

    guards: Guards

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._read_timer = self._stall_timer = None
        super().connection_made(transport)
        self._await_request(after=None)
        if len(self.connections) > self.guards.max_connections:
            self.guards.evict_oldest(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if self._read_timer is not None and cycle is not None and cycle is not self._after and not cycle.more_body:
            self._request_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if self._read_timer is None and not self.transport.is_closing() and cycle is not None \
                and cycle.response_complete:
            self._await_request(after=cycle)  # the next request on this kept-alive connection

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.guards.stall_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._request_arrived()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().connection_lost(exc)

    # --- the guards -----------------------------------------------------------------------------

    def _await_request(self, after) -> None:
        """Start the read deadline of the request after ``after`` (None: the connection's first)."""
        self._after = after
        self._read_timer = self.loop.call_later(self.guards.read_timeout, self._read_timed_out)
        self.guards.reading[self] = None

    def _request_arrived(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self.guards.reading.pop(self, None)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        self.refuse(408, "request_timeout", f"the request did not arrive in full within {self.guards.read_timeout:g} "
                    f"s (the server's --read-timeout); the connection is closed")

    def _stalled(self) -> None:
        """The client has not read for the stall timeout: cut the response (the app sees it gone)."""
        self._stall_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope.setdefault("state", {})["tfb_status"] = STALLED
        log.info("a client read nothing for %g s (--stream-stall-timeout): its response is cut",
                 self.guards.stall_timeout)
        self.transport.abort()

    def refuse(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` (unless a response has started) and close the connection."""
        self._request_arrived()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle is self._after or not cycle.response_started:
            self.transport.write(raw_error(status, code, message, headers or {}))
        self.transport.close()


def raw_error(status: int, code: str, message: str, headers: dict[str, str]) -> bytes:
    """An OpenAI-shaped error as a whole HTTP/1.1 response that closes the connection."""
    from .errors import error_body

    body = json.dumps(error_body(status, message, "invalid_request_error", code=code)).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def guarded_protocol(read_timeout: float, stall_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """A protocol class for one server (its own :class:`Guards`)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guards": Guards(read_timeout, stall_timeout, max_connections)})


def max_connections() -> int:
    """The most open connections: the open-file limit less a reserve (an eighth, at least 64)
    for the server's own files (libraries, the model, the engine's socket, logs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft - max(64, soft // 8))


def raise_open_file_limit() -> None:
    """Raise the open-file soft limit to the hard limit (often 1,024 against 500,000 or more):
    each connection holds a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open-file limit raised from %d to %d", soft, target)
    except (ValueError, OSError) as e:
        log.warning("the open-file limit stays %d (raising it to %d failed: %s); at most %d connections",
                    soft, target, e, max_connections())


def uvicorn_config(app, settings, **kwargs) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` under ``settings``: its address and the guards."""
    protocol = guarded_protocol(settings.read_timeout, settings.stream_stall_timeout, max_connections())
    return uvicorn.Config(app, host=settings.host, port=settings.port, http=protocol, **kwargs)
