"""The engine process (``--engine-process``, the default), as vLLM splits its engine core from its API server.

One Python process holds one interpreter lock: in a single process the event loop (HTTP, JSON,
tokenizing, server-sent events) and the thread that launches the model's steps take turns, and
at many streams each waits for the other. Here the engine has a process of its own: it loads
the posterior, runs the :class:`~server.engine.core.EngineCore` on its thread
(:class:`~server.engine.core.EngineLoop`), and reads the API process's inputs and writes its
outputs on an event loop. Once per turn of that loop it sends one message: the outputs of the
steps since the last turn merged into one :class:`EngineOutputs`, with the engine's stats and
its metric calls (replayed into the API process's registry, so ``/metrics`` is the same).

Messages are pickled lists, each preceded by its length (:mod:`server.engine.protocol`). The
engine process exits when the API process's socket closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import time
from dataclasses import replace
from typing import Callable
import torch

from ..errors import portable
from ..lifecycle import failure_reason, freeze_heap
from ..settings import Settings
from .protocol import (EngineOutputs, EngineStats, Failed, Finished, MetricCall, Outbox, Ready, StartFailed,
                       Status, Stop, TokenDelta, receive)

log = logging.getLogger(__name__)
SOCKET = "engine.sock"
MAX_SOCKET_PATH = 100  # bytes; Linux allows 107 (sun_path)


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


class MetricsRelay:
    """The engine process's :class:`~server.metrics.Metrics`: each recording call (``observe_*``,
    ``set_*``) is put in the outbox as a :class:`MetricCall` at once (a forward's ``running``
    gauge is seen while it runs), and goes out with the loop turn's outputs."""

    def __init__(self, model: str, put: Callable[[MetricCall], None]):
        self.model, self._put = model, put

    def __getattr__(self, name: str):
        if not name.startswith(("observe_", "set_")):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._put(MetricCall(name, args, kwargs))


class Merge:
    """One loop turn's messages as the API process gets them: the outputs and metric calls in one
    :class:`EngineOutputs` with the latest stats; the other messages as they are."""

    def __init__(self):
        self.stats = EngineStats()  # the latest the engine published

    def __call__(self, messages: list) -> list:
        outputs, calls, others, stats = [], [], [], None
        for m in messages:
            match m:
                case EngineOutputs():
                    outputs += m.outputs
                    stats = m.stats
                case MetricCall():
                    calls.append(m)
                case _:
                    others.append(m)
        if stats is None and not outputs and not calls:
            return others
        self.stats = stats or self.stats
        return others + [EngineOutputs(outputs, replace(self.stats, metrics=calls))]


def unpicklable(message, error: Exception):
    """What stands for a message that does not pickle: its item's error, a failed start-up, or nothing."""
    if isinstance(message, (TokenDelta, Finished, Failed)):
        return Failed(message.id, portable(error))
    if isinstance(message, Ready):
        return StartFailed(f"the engine's description does not pickle: {type(error).__name__}: {error}")
    return None


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
    from .. import loader
    from .core import EngineCore, EngineLoop, load_engine
    from .plan import PlanConfig

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(path)
    inbox: asyncio.Queue = asyncio.Queue()  # the API process's inputs; None once it has gone

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
    out = Outbox(loop, writer, Merge(), unpicklable)
    metrics = MetricsRelay(loader.model_id(settings), out.put)
    t0 = time.perf_counter()
    loading = loop.run_in_executor(None, load_engine, settings, metrics, loader.load,
                                   lambda status: out.put(Status(status)))
    first = loop.create_task(inbox.get())
    await asyncio.wait({loading, first}, return_when=asyncio.FIRST_COMPLETED)
    if first.done():  # stopped, or the API process gone, while loading: a load thread cannot be interrupted
        log.info("stopped while loading")
        os._exit(0)
    first.cancel()
    try:
        loaded, resolved, runner = loading.result()
        model = loader.ServedModel.of(loaded, resolved.max_samples, copy_tokenizer=False)
    except BaseException as e:
        log.debug("start-up failed", exc_info=True)
        out.put(StartFailed(failure_reason(e)))
        await out.close()
        return
    log.info("engine loaded in %.1f s", time.perf_counter() - t0)
    engine = EngineLoop(EngineCore(runner, metrics, PlanConfig.of_settings(resolved)), out.put)
    out.put(Ready(model, resolved))
    freeze_heap()  # one model for this process's life
    engine.start()
    while (message := await inbox.get()) is not None:
        engine.put(message)
        if isinstance(message, Stop):
            await asyncio.to_thread(engine.join)
            await out.close()
            return
    log.info("the API process went away; the engine process stops")
    engine.put(Stop())
    await asyncio.to_thread(engine.join)

