"""The engine as the API side sees it: :class:`EngineClient`, in this process or in its own.

The serving layer submits work items and awaits their futures (a stream also reads its event
queue); it never sees the engine's objects. Both clients keep only request id -> future /
event queue (:class:`Requests`), send :mod:`~server.engine.protocol` inputs and apply the
:class:`~server.engine.protocol.EngineOutputs` that come back, with one dispatcher.

- :class:`InprocClient` (``--no-engine-process``, each Ray Serve replica): loads the model in a
  thread, then runs the :class:`~server.engine.core.EngineCore` on a thread of this process.
- :class:`ProcClient` (the default): starts the engine process (server/engine/proc.py) and
  talks to it over a Unix socket; its metric calls are replayed into this process's registry,
  so ``/metrics`` is the same. When the engine process exits, every open request fails with a
  503 and the server reports itself failed.

:func:`make_client` picks one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import BadRequest, NotReady, QueueFull, RequestTimeout, portable
from ..metrics import Metrics
from ..settings import Settings
from .protocol import (Abort, AddRequest, EngineInput, EngineOutputs, Failed, Finished, Outbox, Pause, Ready,
                       Resume, StartFailed, Status, Stop, TokenDelta, Work, receive)

log = logging.getLogger(__name__)

OnReady = Callable[[object, Settings], None]  # (the served model, the resolved settings)
OnFailed = Callable[[str], None]
OnStatus = Callable[[str], None]


def check_room(accepting: bool, waiting: int, new: int, max_queue: int) -> None:
    """Raise unless a request of ``new`` items may join ``waiting`` ones: NotReady (503) while
    draining, QueueFull (429) when the queue is full, BadRequest when it never could be."""
    if not accepting:
        raise NotReady("the server is shutting down; retry on another replica", code="draining")
    if new > max_queue:
        raise BadRequest(f"this request has {new} items (sequences); the queue holds at most "
                         f"{max_queue} (the server's --max-queue), so it can never be accepted: "
                         f"send fewer at a time", code="too_many_items")
    if waiting + new > max_queue:
        raise QueueFull(f"the queue is full ({waiting} of {max_queue} items waiting, this request has "
                        f"{new}); retry later")


@dataclass(eq=False)
class Pending:
    """An open work item, API side: what its outputs go to."""

    future: asyncio.Future  # its result (Finished) or error (Failed)
    events: asyncio.Queue | None  # a stream's (index, TokenDelta | Failed), shared by its request's works
    index: int


class Requests:
    """Open work items by id; :meth:`apply` hands each output to its item (the API side's one dispatcher)."""

    def __init__(self, abort: Callable[[int], None]):
        self._abort = abort
        self._open: dict[int, Pending] = {}
        self._ids = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, works: list[Work], events: asyncio.Queue | None) -> list[asyncio.Future]:
        """Give each work an id and a future; a future ended here first (its client left, a
        timeout) aborts its work in the engine."""
        loop = asyncio.get_running_loop()
        futures = []
        for w in works:
            w.id = next(self._ids)
            future = loop.create_future()
            self._open[w.id] = Pending(future, events, getattr(w, "index", 0))
            future.add_done_callback(lambda f, i=w.id: self._given_up(i))
            futures.append(future)
        self._idle.clear()
        return futures

    def apply(self, outputs: EngineOutputs) -> None:
        for out in outputs.outputs:
            match out:
                case TokenDelta(id=i):
                    p = self._open.get(i)
                    if p is not None and p.events is not None:
                        p.events.put_nowait((p.index, out))
                case Finished(id=i, result=result):
                    p = self._open.pop(i, None)
                    if p is not None and not p.future.done():
                        p.future.set_result(result)
                case Failed(id=i, error=error):
                    self.fail(i, error)
                case _:
                    raise TypeError(f"no output {type(out).__name__}")
        self._check_idle()

    def fail(self, item_id: int, error: BaseException) -> None:
        p = self._open.pop(item_id, None)
        if p is None:
            return
        if not p.future.done():
            p.future.set_exception(error)
        if p.events is not None:
            p.events.put_nowait((p.index, Failed(item_id, error)))

    def fail_all(self, error: BaseException) -> int:
        ids = list(self._open)
        for i in ids:
            self.fail(i, error)
        self._check_idle()
        return len(ids)

    async def until_idle(self) -> None:
        await self._idle.wait()

    def _given_up(self, item_id: int) -> None:
        if self._open.pop(item_id, None) is not None:
            self._abort(item_id)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._open:
            self._idle.set()


async def wait(futures: list[asyncio.Future], timeout: float) -> list[Any]:
    """The works' results; on timeout their work is dropped and RequestTimeout raised."""
    try:
        return await asyncio.wait_for(asyncio.gather(*futures), timeout)
    except asyncio.TimeoutError:
        for f in futures:
            f.cancel()
        raise RequestTimeout(f"the request took longer than the server's timeout "
                             f"({timeout:g} s); its work was dropped", code="timeout") from None


class EngineClient(ABC):
    """What the serving layer calls. ``start(on_ready, on_failed, on_status)`` loads the model and,
    once it serves, calls ``on_ready(model, settings)``; a failed start-up (or, for the engine
    process, its exit) calls ``on_failed(reason)``."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.max_queue = settings.max_queue
        self.requests: Requests | None = None  # made on the event loop, at start
        self.accepting = False
        self._submits = itertools.count(1)
        self._unseen: deque[tuple[int, int]] = deque()  # (submit number, items) the engine had not taken
        self._depth = 0  # the engine's queue depth as last reported

    @abstractmethod
    async def start(self, on_ready: OnReady, on_failed: OnFailed, on_status: OnStatus) -> None: ...

    @abstractmethod
    def send(self, message: EngineInput) -> None:
        """Hand ``message`` to the engine, in order with the others (from the event loop's thread)."""

    @abstractmethod
    async def stop(self) -> None:
        """Drain, then stop the engine (one still loading stops at once)."""

    def submit(self, works: list[Work], events: asyncio.Queue | None = None) -> list[asyncio.Future]:
        """Queue a request's works, all or none, and return their futures; a stream's
        :class:`TokenDelta` go to ``events`` as (work index, delta). Raises QueueFull (429, from
        the engine's queue depth as last reported plus what was sent since), NotReady (503), or
        BadRequest (more items than the queue holds)."""
        check_room(self.accepting and self.requests is not None, self.depth, len(works), self.max_queue)
        futures = self.requests.open(works, events)
        number = next(self._submits)
        self._unseen.append((number, len(works)))
        self.send(AddRequest(number, works))
        return futures

    async def wait(self, futures: list[asyncio.Future], timeout: float) -> list[Any]:
        return await wait(futures, timeout)

    def pause(self) -> None:
        """Take no more work and run no more steps (decode steps included) until :meth:`resume`;
        work submitted meanwhile waits in the queue (429 once it is full). The step running
        finishes. Tests use it to fill the queue or hold sequences where they are."""
        self.send(Pause())

    def resume(self) -> None:
        self.send(Resume())

    @property
    def depth(self) -> int:
        """Items waiting in the engine's queue (as last reported, plus those sent since)."""
        return self._depth + sum(n for _, n in self._unseen)

    @property
    def idle(self) -> bool:
        return self.requests is None or not len(self.requests)

    @property
    def alive(self) -> bool:
        return True

    async def drain(self) -> None:
        """Stop accepting and wait until every queued and running item is answered."""
        self.accepting = False
        if self.requests is not None:
            await self.requests.until_idle()

    def _abort(self, item_id: int) -> None:
        self.send(Abort([item_id]))

    def apply(self, outputs: EngineOutputs) -> None:
        """The engine's outputs and stats (on the event loop)."""
        stats = outputs.stats
        self._depth = stats.depth
        while self._unseen and self._unseen[0][0] <= stats.seen:
            self._unseen.popleft()
        for call in stats.metrics:
            getattr(self.metrics, call.name)(*call.args, **call.kwargs)
        self.requests.apply(outputs)


class InprocClient(EngineClient):
    """The engine on a thread of this process; ``load`` loads the posterior (in a thread)."""

    def __init__(self, settings: Settings, metrics: Metrics, load: Callable, runner: Callable | None = None):
        super().__init__(settings, metrics)
        self.load, self.runner = load, runner
        self.loop_thread = None  # the EngineLoop, once loaded
        self.loaded = None  # the posterior this process loaded

    async def start(self, on_ready: OnReady, on_failed: OnFailed, on_status: OnStatus) -> None:
        from ..lifecycle import failure_reason
        from ..loader import ServedModel
        from .core import EngineCore, EngineLoop, load_engine
        from .plan import PlanConfig

        loop = asyncio.get_running_loop()
        self.requests = Requests(self._abort)

        def work() -> None:
            t0 = time.perf_counter()
            try:
                loaded, settings, runner = load_engine(self.settings, self.metrics, self.load,
                                                       lambda status: loop.call_soon_threadsafe(on_status, status),
                                                       **({"runner": self.runner} if self.runner else {}))
                model = ServedModel.of(loaded, settings.max_samples)
            except BaseException as e:  # any failure: one line, then the CLI exits non-zero
                log.debug("start-up failed", exc_info=True)
                loop.call_soon_threadsafe(on_failed, failure_reason(e))
                return
            log.info("loaded in %.1f s", time.perf_counter() - t0)
            core = EngineCore(runner, self.metrics, PlanConfig.of_settings(settings))
            loop.call_soon_threadsafe(serve, core, loaded, model, settings)

        def serve(core, loaded, model, settings) -> None:
            self.loaded, self.settings = loaded, settings
            self.loop_thread = EngineLoop(core, lambda outputs: loop.call_soon_threadsafe(self.apply, outputs))
            self.loop_thread.start()
            self.accepting = True
            on_ready(model, settings)

        threading.Thread(target=work, name="tfb-load", daemon=True).start()

    def send(self, message: EngineInput) -> None:
        if self.loop_thread is not None:
            self.loop_thread.put(message)

    async def stop(self) -> None:
        if self.accepting:
            await self.drain()
        self.accepting = False
        if self.loop_thread is not None:
            self.loop_thread.put(Stop())
            await asyncio.to_thread(self.loop_thread.join)


class ProcClient(EngineClient):
    """The engine in a process of its own (server/engine/proc.py)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        super().__init__(settings, metrics)
        self.process: multiprocessing.Process | None = None
        self._outbox: Outbox | None = None  # to the engine process, once it connected
        self._stopping = False
        self._dir: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._on_ready: OnReady | None = None
        self._on_failed: OnFailed | None = None
        self._on_status: OnStatus | None = None

    async def start(self, on_ready: OnReady, on_failed: OnFailed, on_status: OnStatus) -> None:
        from .proc import SOCKET, engine_main, socket_dir

        self._on_ready, self._on_failed, self._on_status = on_ready, on_failed, on_status
        self.requests = Requests(self._abort)
        try:
            self._dir = socket_dir()
            path = os.path.join(self._dir, SOCKET)
            self._server = await asyncio.start_unix_server(self._connect, path)
            self.process = multiprocessing.get_context("spawn").Process(
                target=engine_main, args=(self.settings, path, logging.getLogger().level), name="tfb-engine",
                daemon=True)
            self.process.start()
        except Exception as e:
            log.debug("starting the engine process failed", exc_info=True)
            on_failed(f"the engine process could not start: {type(e).__name__}: {e}")
            return
        log.info("engine process %d started", self.process.pid)
        asyncio.get_running_loop().create_task(self._watch(), name="tfb-engine-watch")

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._outbox is not None:  # only the engine process connects, once
            writer.close()
            return
        self._outbox = Outbox(asyncio.get_running_loop(), writer)
        self._server.close()  # the one connection is made: the socket's file is not needed
        self._remove_dir()
        try:
            while (messages := await receive(reader)) is not None:
                for message in messages:
                    try:
                        self._handle(message)
                    except Exception as e:  # never the end of the reading
                        log.exception("handling the engine process's %s message failed", type(message).__name__)
                        self._failed_handling(message, e)
        finally:
            writer.close()
            await self._gone()

    def _handle(self, message) -> None:
        match message:
            case EngineOutputs():
                self.apply(message)
            case Status(status=status):
                self._on_status(status)
            case Ready(model=model, settings=settings) if not self._stopping:
                self.settings, self.accepting = settings, True
                self._on_ready(model, settings)
            case Ready():
                pass  # stopped while it loaded
            case StartFailed(reason=reason):
                self._stopping = True  # it exits next: its reason is the one to report
                self._on_failed(reason)
            case _:
                raise TypeError(f"no engine message {type(message).__name__}")

    def _failed_handling(self, message, error: Exception) -> None:
        """A message that could not be handled fails what waits for it: its items, or the start-up."""
        if isinstance(message, Ready):
            self._stopping = True
            self._on_failed(f"the server could not start serving: {type(error).__name__}: {error}")
        elif isinstance(message, EngineOutputs):
            for out in message.outputs:
                self.requests.fail(out.id, portable(error))

    async def _watch(self) -> None:
        """An engine process that exits before it connects (it failed to start) is gone too."""
        while self.process.is_alive() and self._outbox is None:
            await asyncio.sleep(0.05)
        if self._outbox is None:
            await self._gone()

    async def _gone(self) -> None:
        """The engine process exited: every open request fails, and so does the server."""
        self.accepting = False
        if self._stopping:
            return
        self._stopping = True
        if self.process is not None:  # reaped, for its exit code (it closed its socket: it is most likely exiting)
            await asyncio.to_thread(self.process.join, 2)
        code = self.process.exitcode if self.process is not None else None
        reason = f"the engine process exited (exit code {code})" if code is not None else \
            "the engine process closed its connection"
        failed = self.requests.fail_all(NotReady(f"{reason}; retry on another replica", code="engine_exited"))
        self._on_failed(f"{reason}; {failed} open items failed")

    def send(self, message: EngineInput) -> None:
        if self._outbox is not None:
            self._outbox.put(message)

    @property
    def alive(self) -> bool:
        """Whether the engine process is running (False once it has exited, before its closed
        connection is handled)."""
        return self.process is not None and self.process.is_alive()

    async def stop(self, timeout: float = 30.0) -> None:
        if self.accepting:
            await self.drain()
        self._stopping, self.accepting = True, False
        process = self.process
        if process is not None and process.is_alive():
            if self._outbox is not None:
                self._outbox.put(Stop())
                await asyncio.to_thread(process.join, timeout)
            if process.is_alive():  # not connected yet, or not stopping: it ignores SIGTERM and SIGINT
                process.kill()
                await asyncio.to_thread(process.join, 5)
        if self._server is not None:
            self._server.close()
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def make_client(settings: Settings, metrics: Metrics, load: Callable, separate: bool,
                runner: Callable | None = None) -> EngineClient:
    """The engine's client: in a process of its own if ``separate`` (which loads with
    :func:`server.loader.load`), else in this process, loading with ``load`` and making its
    :class:`~server.engine.core.ModelRunner` with ``runner`` (the default: ModelRunner itself)."""
    if separate:
        return ProcClient(settings, metrics)
    return InprocClient(settings, metrics, load, runner)
