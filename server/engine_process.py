"""The engine in a process of its own (``--engine-process``), as vLLM splits its engine core
from its API server.

One Python process holds one interpreter lock: in a single process the event loop (HTTP,
JSON, tokenizing, server-sent events) and the worker thread that launches the model's steps
take turns, and at many streams each waits for the other. Here they are two processes:

- the API process keeps HTTP, tokenizing and streaming. :class:`EngineClient` takes the
  scheduler's calls (``submit``, ``wait``, ``depth``, ``idle``, ``drain``, ``stop``, ``pause``,
  ``resume``), sends each work item over a Unix socket as plain data, and keeps its futures
  and event queues;
- the engine process (:func:`engine_main`) loads the posterior and runs the same
  :class:`~server.scheduler.Scheduler` and :class:`~server.engine.ModelRunner` on an event
  loop of its own. Once per turn of that loop it sends one message holding each stream's
  new events, each finished item's result or error, its metric calls (replayed into the API
  process's registry, so ``/metrics`` is the same) and its queue depth.

Messages are pickled lists, each preceded by its length. A request the API process gives up
(a client gone, a timeout) is cancelled in the engine at its next step. The engine process
exits when the API process's socket closes; when the engine process exits, every open request
fails with a 503 and the server reports itself failed (``/health`` 503, ``tfb serve`` exits 1).
"""

from __future__ import annotations

import asyncio
import copyreg
import io
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import tempfile
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Any, Callable

import torch

from tfb_core import GenSequence

from .engine import ChoiceWork, GenWork, ScoreWork
from .errors import NotReady, portable
from .metrics import Metrics
from .scheduler import check_room, until_idle, wait
from .settings import Settings

log = logging.getLogger(__name__)
HEADER = struct.Struct("!I")  # a message's length in bytes
SOCKET = "engine.sock"
MAX_SOCKET_PATH = 100  # bytes; Linux allows 107 (sun_path)


class Outbox:
    """Messages for the other process: :meth:`put` from any thread; the loop sends everything
    put since its last turn as one message."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter,
                 extra: Callable[[], list] = list):
        self.loop, self.writer, self.extra = loop, writer, extra
        self._items: list = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._loop_thread = threading.get_ident()

    def put(self, message: tuple) -> None:
        with self._lock:
            self._items.append(message)
            if self._scheduled:
                return
            self._scheduled = True
        if threading.get_ident() == self._loop_thread:
            self.loop.call_soon(self.flush)
        else:
            self.loop.call_soon_threadsafe(self.flush)

    async def close(self) -> None:
        """Send what is left, then close."""
        self.flush()
        await self.writer.drain()
        self.writer.close()

    def flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        if self.writer.is_closing():
            return
        items += self.extra()
        try:
            data = dumps(items)
        except Exception:  # one message that does not pickle costs only itself (its item fails)
            items = [m for m in map(_pickled, items) if m is not None]
            data = dumps(items)
        self.writer.write(HEADER.pack(len(data)) + data)


def _tensor_as_array(t: torch.Tensor):
    """A tensor pickled as its numpy array: torch's own reduction goes through ``torch.load``
    and costs several times more each way, and every answer carries small tensors (its
    per-sample probabilities). It crosses on the CPU: the API process never touches the GPU.
    A dtype numpy lacks (bfloat16) or a sparse tensor crosses as torch pickles it."""
    t = t.detach().cpu().resolve_conj().resolve_neg()
    if t.layout is torch.strided and t.dtype is not torch.bfloat16:
        try:
            return torch.from_numpy, (t.numpy(),)
        except (RuntimeError, TypeError):  # a dtype numpy lacks
            pass
    return t.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def dumps(obj) -> bytes:
    """``obj`` pickled for the other process (:func:`receive` loads it)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    # copyreg's table as it is now, plus tensors; a dict (a ChainMap's lookups, in Python, made
    # a step's 64 events twice as slow to pickle)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _tensor_as_array}
    pickler.dump(obj)
    return buf.getvalue()


def _pickled(message: tuple) -> tuple | None:
    """``message`` if it pickles, else what stands for it: its item's error, a failed start-up,
    or nothing (a metric call)."""
    try:
        dumps(message)
        return message
    except Exception as e:
        log.exception("a %r message does not pickle", message[0])
        if message[0] in ("done", "error", "event"):
            return "error", message[1], portable(e)
        if message[0] == "ready":
            return "failed", f"the engine's description does not pickle: {type(e).__name__}: {e}"
        return None


async def receive(reader: asyncio.StreamReader) -> list | None:
    """The next message, or None once the other process has gone."""
    try:
        size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# --- work items as plain data ------------------------------------------------------------------


def to_wire(item_id: int, item) -> tuple:
    """(id, kind, fields): a work item without its future and event queue (they stay in the API process)."""
    if isinstance(item, ChoiceWork):
        return item_id, "choice", (item.encoded, item.seed, item.num_samples, item.deadline, item.arrived)
    if isinstance(item, ScoreWork):
        return item_id, "score", (item.prompt_ids, item.seed, item.num_samples, item.top_logprobs, item.deadline,
                                  item.arrived)
    return item_id, "generate", (item.seq, item.endpoint, item.deadline, item.index, item.events is not None,
                                 item.arrived)


def from_wire(spec: tuple, loop: asyncio.AbstractEventLoop, put: Callable[[tuple], None]):
    """The engine process's work item for ``spec``; a stream's events go to ``put``."""
    item_id, kind, fields = spec
    if kind == "choice":
        encoded, seed, num_samples, deadline, arrived = fields
        return ChoiceWork(encoded, seed, num_samples, deadline, loop.create_future(), arrived)
    if kind == "score":
        prompt_ids, seed, num_samples, top, deadline, arrived = fields
        return ScoreWork(prompt_ids, seed, num_samples, top, deadline, loop.create_future(), arrived)
    seq, endpoint, deadline, index, streamed, arrived = fields
    return GenWork(seq, endpoint, deadline, loop.create_future(), EventSink(item_id, put) if streamed else None,
                   loop, index, arrived)


class EventSink:
    """A streamed work's event queue in the engine process: each event goes to the API process."""

    def __init__(self, item_id: int, put: Callable[[tuple], None]):
        self.item_id, self.put = item_id, put

    def put_nowait(self, pair: tuple) -> None:
        event = pair[1]
        if event.token is None and event.finish_reason == "error":
            return  # a failed work: the API side's work makes this event when its error arrives
        self.put(("event", self.item_id, event))


def result_to_wire(result):
    """A finished sequence without its random generator (on the device), its grammar's state and its
    step's exception (a failed sequence is answered with its error instead); a scoring output as it is."""
    return replace(result, generator=None, failure=None, constraint=None) if isinstance(result, GenSequence) \
        else result


class MetricsRelay:
    """The engine process's :class:`~server.metrics.Metrics`: each recording call (``observe_*``,
    ``set_work``) is sent to the API process's, which records it."""

    def __init__(self, model: str, put: Callable[[tuple], None]):
        self.model, self._put = model, put

    def __getattr__(self, name: str):
        if not name.startswith(("observe_", "set_")):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._put(("metric", name, args, kwargs))


# --- the API process's side ------------------------------------------------------------------


class EngineClient:
    """The scheduler, as the API process sees it, of an engine in its own process."""

    def __init__(self, settings: Settings, metrics: Metrics, on_ready: Callable, on_failed: Callable[[str], None],
                 on_status: Callable[[str], None]):
        self.settings, self.metrics = settings, metrics
        self.on_ready, self.on_failed, self.on_status = on_ready, on_failed, on_status
        self.max_queue = settings.max_queue
        self.process: multiprocessing.Process | None = None
        self._items: dict[int, Any] = {}  # sent, not yet answered: id -> the API side's work
        self._ids = itertools.count()
        self._submits = itertools.count(1)
        self._unseen: deque[tuple[int, int]] = deque()  # (submit number, items) the engine had not seen
        self._depth = 0  # the engine's queue depth as last reported
        self._outbox: Outbox | None = None
        self._accepting = False
        self._stopping = False
        self._dir: str | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._dir = socket_dir()
        path = os.path.join(self._dir, SOCKET)
        self._server = await asyncio.start_unix_server(self._connect, path)
        self.process = multiprocessing.get_context("spawn").Process(
            target=engine_main, args=(self.settings, path, logging.getLogger().level), name="tfb-engine",
            daemon=True)
        self.process.start()
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
                        log.exception("handling the engine process's %r message failed", message[0])
                        self._failed_handling(message, e)
        finally:
            writer.close()
            await self._gone()

    def _failed_handling(self, message: tuple, error: Exception) -> None:
        """A message that could not be handled fails what waits for it: its item, or the start-up."""
        if message[0] == "ready":
            self._stopping = True
            self.on_failed(f"the server could not start serving: {type(error).__name__}: {error}")
        elif message[0] in ("done", "error", "event"):
            work = self._items.pop(message[1], None)
            if work is not None and not work.future.done():
                work.future.set_exception(portable(error))

    async def _watch(self) -> None:
        """An engine process that exits before it connects (it failed to start) is gone too."""
        while self.process.is_alive() and self._outbox is None:
            await asyncio.sleep(0.05)
        if self._outbox is None:
            await self._gone()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "event":
            work = self._items.get(message[1])
            if work is not None:
                event = message[2]
                if event.token is not None:
                    work.seq.tokens.append(event.token)
                work.events.put_nowait((work.index, event))
        elif kind == "done":
            work = self._items.pop(message[1], None)
            if work is not None and not work.future.done():
                if isinstance(work, GenWork):
                    work.seq = message[2]
                work.future.set_result(message[2])
        elif kind == "error":
            work = self._items.pop(message[1], None)
            if work is not None and not work.future.done():
                work.future.set_exception(message[2])
        elif kind == "metric":
            getattr(self.metrics, message[1])(*message[2], **message[3])
        elif kind == "depth":
            seen, self._depth = message[1], message[2]
            while self._unseen and self._unseen[0][0] <= seen:
                self._unseen.popleft()
        elif kind == "status":
            self.on_status(message[1])
        elif kind == "ready" and not self._stopping:
            self._accepting = True
            self.on_ready(message[1], message[2], self)
        elif kind == "failed":
            self._stopping = True  # it exits next: its reason is the one to report
            self.on_failed(message[1])

    async def _gone(self) -> None:
        """The engine process exited: every open request fails, and so does the server."""
        self._accepting = False
        if self._stopping:
            return
        self._stopping = True
        if self.process is not None:  # reaped, for its exit code (it closed its socket: it is most likely exiting)
            await asyncio.to_thread(self.process.join, 2)
        code = self.process.exitcode if self.process is not None else None
        reason = f"the engine process exited (exit code {code})" if code is not None else \
            "the engine process closed its connection"
        items, self._items = self._items, {}
        for work in items.values():
            if not work.future.done():
                work.future.set_exception(NotReady(f"{reason}; retry on another replica", code="engine_exited"))
        self.on_failed(f"{reason}; {len(items)} open items failed")

    # --- the scheduler's calls ------------------------------------------------------------------

    def submit(self, items: list) -> None:
        """Send a request's items, all or none; raises here, as :func:`check_room` does: QueueFull
        (429, from the engine's queue depth as last reported plus what was sent since), NotReady
        (503), or BadRequest (more items than the queue holds)."""
        check_room(self._accepting, self.depth, len(items), self.max_queue)
        number = next(self._submits)
        specs = []
        for item in items:
            item_id = next(self._ids)
            self._items[item_id] = item
            item.future.add_done_callback(lambda f, item_id=item_id: self._given_up(item_id))
            specs.append(to_wire(item_id, item))
        self._unseen.append((number, len(items)))
        self._outbox.put(("submit", number, specs))

    def _given_up(self, item_id: int) -> None:
        """An item the API side ended before its answer came (its client left, or it timed out)."""
        if self._items.pop(item_id, None) is not None and self._outbox is not None:
            self._outbox.put(("cancel", item_id))

    async def wait(self, items: list, timeout: float) -> list:
        return await wait(items, timeout)

    def pause(self) -> None:
        """The engine's :meth:`Scheduler.pause <server.scheduler.Scheduler.pause>`, in order with
        the work sent before and after (from any thread)."""
        self._outbox.put(("pause",))

    def resume(self) -> None:
        self._outbox.put(("resume",))

    @property
    def depth(self) -> int:
        return self._depth + sum(n for _, n in self._unseen)

    @property
    def alive(self) -> bool:
        """Whether the engine process is running (False once it has exited, before its closed
        connection is handled)."""
        return self.process is not None and self.process.is_alive()

    @property
    def idle(self) -> bool:
        return not self._items

    async def drain(self) -> None:
        self._accepting = False
        await until_idle(self)

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain, then stop the engine process (one still loading stops at once)."""
        if self._accepting:
            await self.drain()
        self._stopping, self._accepting = True, False
        process = self.process
        if process is not None and process.is_alive():
            if self._outbox is not None:
                self._outbox.put(("stop",))
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


def socket_dir() -> str:
    """A private directory (mode 0700) for the engine's socket: in the temporary directory
    ($TMPDIR), or in /tmp where that path is too long for a Unix socket's (107 bytes)."""
    try:
        where = tempfile.mkdtemp(prefix="tfb-engine-")
        if len(os.path.join(where, SOCKET).encode()) <= MAX_SOCKET_PATH:
            return where
        os.rmdir(where)
        return tempfile.mkdtemp(prefix="tfb-engine-", dir="/tmp")
    except OSError as e:
        raise OSError(f"no directory for its socket ({e}): set TMPDIR to a writable directory, or serve "
                      f"with --no-engine-process") from None


def start_engine_process(state, ready: Callable, fail: Callable) -> Callable[[], Any]:
    """Start the engine process for ``state``; ``ready(state, model, client)`` runs once it has
    loaded, ``fail(state, reason, when)`` if it fails. Returns what stops it."""

    def on_ready(model, settings, client) -> None:
        state.settings = settings
        ready(state, model, client)

    def on_failed(reason: str) -> None:
        fail(state, reason, "start-up" if state.status in ("loading", "searching") else "serving")

    def on_status(status: str) -> None:
        state.status = status

    client = state.engine = EngineClient(state.settings, state.metrics, on_ready, on_failed, on_status)

    async def start() -> None:
        try:
            await client.start()
        except Exception as e:
            log.debug("starting the engine process failed", exc_info=True)
            on_failed(f"the engine process could not start: {type(e).__name__}: {e}")

    asyncio.get_running_loop().create_task(start(), name="tfb-engine-start")
    return client.stop


# --- the engine process's side ---------------------------------------------------------------


def engine_main(settings: Settings, path: str, log_level: int) -> None:
    """The engine process: load, then serve the API process's work until it stops or goes."""
    # the API process drains and stops this one: a signal to the whole process group (Ctrl-C,
    # a supervisor's SIGTERM) must not cut its requests
    # (a handler, not SIG_IGN: an ignored signal stays ignored in the processes this one starts)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    _die_with_parent()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(settings.torch_threads)
    log.info("torch uses %d CPU threads (process %d)", torch.get_num_threads(), os.getpid())
    asyncio.run(_serve_engine(settings, path))


def _ignore(signum, frame) -> None:
    pass


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process when the thread that started it ends (the
    server's event loop: it ends with the server, after stopping this process)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere: the closed socket stops it


async def _serve_engine(settings: Settings, path: str) -> None:
    from . import loader
    from .app import failure_reason, freeze_heap
    from .engine import load_engine
    from .scheduler import Scheduler

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(path)
    inbox: asyncio.Queue = asyncio.Queue()  # the API process's messages; None once it has gone

    async def read() -> None:
        try:
            while (messages := await receive(reader)) is not None:
                for message in messages:
                    inbox.put_nowait(message)
        except Exception:  # a message that does not unpickle: the API process is not one to talk to
            log.exception("reading the API process's messages failed; the engine process stops")
        finally:
            inbox.put_nowait(None)

    reading = loop.create_task(read(), name="tfb-engine-read")  # noqa: F841 (held: tasks are weakly kept)
    seen = 0  # the last submit handled
    scheduler: Scheduler | None = None
    out = Outbox(loop, writer, lambda: [("depth", seen, scheduler.depth)] if scheduler is not None else [])
    metrics = MetricsRelay(loader.model_id(settings), out.put)
    t0 = time.perf_counter()
    loading = loop.run_in_executor(None, load_engine, settings, metrics, loader.load,
                                   lambda status: out.put(("status", status)))
    first = loop.create_task(inbox.get())
    await asyncio.wait({loading, first}, return_when=asyncio.FIRST_COMPLETED)
    if first.done():  # stopped, or the API process gone, while loading: a load thread cannot be interrupted
        log.info("stopped while loading")
        os._exit(0)
    first.cancel()
    try:
        loaded, resolved, runner = loading.result()
        model = loader.ServedModel.of(loaded, copy_tokenizer=False)
    except BaseException as e:
        log.debug("start-up failed", exc_info=True)
        out.put(("failed", failure_reason(e)))
        await out.close()
        return
    log.info("engine loaded in %.1f s", time.perf_counter() - t0)
    scheduler = Scheduler.of_settings(runner.step, metrics, resolved, runner.engine)
    scheduler.start()
    items: dict[int, Any] = {}  # id -> this process's work, until answered

    def answer(item_id: int, future: asyncio.Future) -> None:
        items.pop(item_id, None)
        if future.cancelled():
            return  # by the API side: it knows
        error = future.exception()
        out.put(("error", item_id, portable(error)) if error is not None
                else ("done", item_id, result_to_wire(future.result())))

    out.put(("ready", model, resolved))
    freeze_heap()  # one model for this process's life
    while (message := await inbox.get()) is not None:
        kind = message[0]
        if kind == "submit":
            _, seen, specs = message
            works = [from_wire(spec, loop, out.put) for spec in specs]
            try:
                scheduler.submit(works)
            except Exception as e:  # not expected: the API side checks against a depth at least this one's
                for item_id, _, _ in specs:
                    out.put(("error", item_id, portable(e)))
                continue
            for (item_id, _, _), work in zip(specs, works):
                items[item_id] = work
                work.future.add_done_callback(lambda f, item_id=item_id: answer(item_id, f))
        elif kind == "cancel":
            work = items.pop(message[1], None)
            if work is not None:
                work.future.cancel()
        elif kind == "pause":
            scheduler.pause()
        elif kind == "resume":
            scheduler.resume()
        elif kind == "stop":
            await scheduler.stop()
            await out.close()
            return
    log.info("the API process went away; the engine process stops")
    for work in items.values():
        work.future.cancel()
    await scheduler.stop()
