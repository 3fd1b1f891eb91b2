"""The batching scheduler: a bounded queue, a coalescing loop, and one worker thread.

Requests become work items (one per question). Items wait in a bounded queue (full: 429);
the loop takes what is waiting, up to ``max_batch_size`` items and ``max_batch_tokens``
padded tokens (rows x length, i.e. prompt tokens x K), waiting at most ``max_wait_ms`` for
more, drops items whose request has timed out, and hands the :class:`Batch` to ``step`` on
the single worker thread that owns the model. While a forward runs, new items queue up and
form the next batch.

A batch holds items of one ``kind`` ("choice" or "generate"), so the model step stays
narrow: ``step(batch) -> one result per item``. Text generation is continuous: a "generate"
batch is prefilled and joins the running decode batch (its items answer later, when their
sequences finish: their step result is :data:`PENDING`), and while sequences are active the
worker runs decode steps back to back until new work arrives, which the loop then takes
between two steps without waiting.

New generation work can join a running batch in groups (as TGI's ``waiting_served_ratio`` and
``max_waiting_tokens`` do): a prefill forward costs about one decode step on a GPU however
few prompts it runs (it reads every weight once), so one admission per finished sequence
costs a busy server a step each. With ``admit_ratio`` > 0, while sequences decode, waiting
generation work joins once its number reaches ``admit_ratio`` x the running sequences, or once
the oldest has waited ``admit_wait_ms``; an idle decoder admits at once. 0 (the default):
each joins at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .errors import BadRequest, NotReady, QueueFull, RequestTimeout, as_api_error
from .metrics import Metrics

log = logging.getLogger(__name__)


class WorkItem(Protocol):
    """What the scheduler batches; the serving layer defines the concrete kinds."""

    kind: str  # items of one kind share a batch and a step
    rows: int  # sequence rows in the forward (choices x K)
    length: int  # the longest row, in tokens
    arrived: float  # time.monotonic() at submit
    deadline: float  # time.monotonic() after which the work is dropped
    future: asyncio.Future  # resolved with the step's result for this item


@dataclass
class Batch:
    """Items run in one forward; ``cost`` is its padded size: rows x longest row."""

    kind: str
    items: list[WorkItem] = field(default_factory=list)
    rows: int = 0
    length: int = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def cost(self) -> int:
        return self.rows * self.length

    def cost_with(self, item: WorkItem) -> int:
        return (self.rows + item.rows) * max(self.length, item.length)

    def fits(self, item: WorkItem, max_size: int, max_tokens: int) -> bool:
        """Whether ``item`` may join; an empty batch takes any item: one above ``max_tokens`` runs
        alone (the serving layer caps an item's size: ``Settings.max_item_tokens``)."""
        if not self.items:
            return True
        return (item.kind == self.kind and len(self.items) < max_size
                and self.cost_with(item) <= max_tokens)

    def add(self, item: WorkItem) -> None:
        self.items.append(item)
        self.rows += item.rows
        self.length = max(self.length, item.length)

    def filter(self, now: float) -> list[WorkItem]:
        """Drop items whose request gave up (cancelled) or whose deadline passed; return them."""
        keep, dropped = [], []
        for item in self.items:
            (dropped if item.future.done() or now >= item.deadline else keep).append(item)
        if dropped:
            self.items, self.rows, self.length = [], 0, 0
            for item in keep:
                self.add(item)
        return dropped


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


async def wait(items: list[WorkItem], timeout: float) -> list[Any]:
    """The items' results; on timeout their work is dropped and RequestTimeout raised."""
    try:
        return await asyncio.wait_for(asyncio.gather(*(it.future for it in items)), timeout)
    except asyncio.TimeoutError:
        for it in items:
            it.future.cancel()
        raise RequestTimeout(f"the request took longer than the server's timeout "
                             f"({timeout:g} s); its work was dropped", code="timeout") from None


async def until_idle(scheduler, poll: float = 0.02) -> None:
    """Wait until every item ``scheduler`` took is answered."""
    while not scheduler.idle:
        await asyncio.sleep(poll)


Step = Callable[[Batch], list[Any]]
PENDING = object()  # a step result meaning "answered later by the decode loop"


class Decoder(Protocol):
    """The continuous part of the work (text generation); runs on the worker thread."""

    active: int  # sequences being decoded
    kv_rows: int  # KV cache rows they hold

    def step(self) -> None: ...

    def fail(self, error: Exception) -> None: ...  # answer every active sequence with error


class Scheduler:
    """Coalesces queued work items into batches and runs ``step`` on one worker thread.

    Parameters
    ----------
    step : callable
        ``step(batch) -> list`` with one result per item (an Exception fails that item only).
        Called only from the worker thread, so it may own the model.
    """

    def __init__(self, step: Step, metrics: Metrics, max_batch_size: int = 32,
                 max_batch_tokens: int = 16384, max_wait_ms: float = 5.0, max_queue: int = 256,
                 decoder: Decoder | None = None, max_kv_rows: int | None = None,
                 admit_ratio: float = 0.0, admit_wait_ms: float = 0.0):
        self.step = step
        self.decoder = decoder
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_kv_rows = max_kv_rows  # generation's KV rows, running and being admitted
        self.admit_ratio = admit_ratio  # new generation joins a running batch in groups of this x its size
        self.admit_wait = admit_wait_ms / 1000  # ... or once the oldest has waited this long
        self._waiting: deque[WorkItem] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfb-model")
        self._accepting = False
        self._outstanding: set[WorkItem] = set()  # submitted, not yet answered
        self._arrivals = 0  # submits so far: the worker's decode turn ends when it changes
        self._paused = False  # take no work and run no step until resume()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.running = 0  # items in the forward now

    @classmethod
    def of_settings(cls, step: Step, metrics: Metrics, settings, decoder: Decoder | None = None) -> "Scheduler":
        """The scheduler that ``settings`` (``tfb serve``'s flags) describe."""
        s = settings
        return cls(step, metrics, s.max_batch_size, s.max_batch_tokens, s.max_wait_ms, s.max_queue, decoder=decoder,
                   max_kv_rows=s.max_kv_rows, admit_ratio=s.admit_ratio, admit_wait_ms=s.admit_wait_ms)

    # --- the API of the serving layer ---------------------------------------------------------

    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="tfb-scheduler")

    def submit(self, items: list[WorkItem]) -> None:
        """Queue a request's items, all or none; raises QueueFull (429) or NotReady (503)."""
        check_room(self._accepting, len(self._waiting), len(items), self.max_queue)
        self._waiting.extend(items)
        self._arrivals += 1
        for item in items:
            self._outstanding.add(item)
            item.future.add_done_callback(lambda _, item=item: self._outstanding.discard(item))
        self.metrics.set_work(queued=len(self._waiting))
        self._arrived.set()

    async def wait(self, items: list[WorkItem], timeout: float) -> list[Any]:
        return await wait(items, timeout)

    def pause(self) -> None:
        """Take no more work and run no more steps (decode steps included) until :meth:`resume`;
        work submitted meanwhile waits in the queue (429 once it is full). A batch already taken
        and the decode step running finish. From any thread: tests use it to fill the queue or
        hold sequences where they are, instead of racing a long request."""
        self._paused = True
        self._wake()

    def resume(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        if self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self._arrived.set)

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._outstanding

    async def drain(self) -> None:
        """Stop accepting and wait until every queued and running item is answered."""
        self._accepting = False
        await until_idle(self)

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    # --- the loop ---------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._paused:
                self._arrived.clear()
                await self._arrived.wait()
            decoding = self.decoder is not None and self.decoder.active > 0
            batch = self._take_waiting() if decoding else await self._next_batch()
            arrivals = self._arrivals  # work submitted from here on ends the next decode turn
            if batch is not None:
                await self._run(loop, batch)
            if self.decoder is not None and self.decoder.active > 0:
                self._set_running(self.decoder.active)
                steps = 1 if self._runnable_waiting() else None  # left behind: taken after one step
                until = self._held_until() or math.inf  # held generation work joins by then
                try:
                    await loop.run_in_executor(self._pool, self._decode, arrivals, steps, until)
                except Exception as e:  # the decoder reruns a failed step per sequence; this is past that
                    log.exception("decode step of %d sequences failed", self.decoder.active)
                    await loop.run_in_executor(self._pool, self.decoder.fail, as_api_error(e))
                finally:
                    self._set_running(0)

    def _decode(self, arrivals: int, steps: int | None = None, until: float = math.inf) -> None:
        """Decode steps back to back on the worker thread (the event loop is not between one
        step and the next), until new work was submitted (``arrivals`` changed: the loop takes
        it between steps), a sequence left while work waits (it may fit the KV rows now),
        ``steps`` steps ran, the time ``until`` passed (held generation work is due), the
        scheduler was paused, or no sequence is active."""
        active, done = self.decoder.active, 0
        while self.decoder.active > 0:
            self.decoder.step()
            done += 1
            if self._arrivals != arrivals or (self._waiting and self.decoder.active < active) or done == steps \
                    or time.monotonic() >= until or self._paused:
                return

    def _runnable_waiting(self) -> bool:
        """Whether waiting work could run now (left behind by the last batch: another kind, or
        over its size or token budget), not only generation waiting for KV rows. The loop's
        thread only (it iterates the queue)."""
        hold = self._held_until() is not None
        for item in self._waiting:
            if item.kind != "generate":
                return True
            if hold:
                continue  # scoring behind it may run
            return self._kv_fits(Batch(item.kind), item)  # generation is admitted in order
        return False

    def _held_until(self) -> float | None:
        """When waiting generation work that waits to join the running batch in a larger group is
        due (None: none waits so): while sequences decode, it waits until ``admit_ratio`` x their
        number wait (at most a full batch), or the oldest has waited ``admit_wait``. The loop's
        thread only."""
        active = self.decoder.active if self.decoder is not None else 0
        if self.admit_ratio <= 0 or active == 0:
            return None
        group = min(math.floor(self.admit_ratio * active), self.max_batch_size)
        waiting = [item for item in self._waiting if item.kind == "generate"]
        if not waiting or len(waiting) >= group:
            return None
        due = waiting[0].arrived + self.admit_wait
        return due if time.monotonic() < due else None

    def _set_running(self, n: int) -> None:
        active = self.decoder.active if self.decoder is not None else 0
        self.running = max(n, active)
        self.metrics.set_work(running=self.running)

    async def _run(self, loop, batch: Batch) -> None:
        dropped = batch.filter(time.monotonic())
        self._fail_dropped(dropped)
        if not batch.items:
            return
        self._set_running(len(batch) + (self.decoder.active if self.decoder is not None else 0))
        now = time.monotonic()
        for item in batch.items:
            self.metrics.observe_queue_wait(now - item.arrived)
        try:
            results = await self._step(loop, batch)
        finally:
            self._set_running(0)
        for item, result in zip(batch.items, results):
            if item.future.done() or result is PENDING:  # timed out meanwhile, or answered later
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    async def _step(self, loop, batch: Batch) -> list[Any]:
        """``step(batch)``; if it fails, each item again alone, so one bad item fails one request."""
        try:
            return await loop.run_in_executor(self._pool, self.step, batch)
        except Exception as e:  # the one place a failed forward is logged
            if len(batch) == 1:
                log.exception("a %s item failed", batch.kind)
                return [as_api_error(e)]
            log.warning("a batch of %d %s items failed (%s); running each alone", len(batch), batch.kind,
                        type(e).__name__)
        results = []
        for item in batch.items:
            alone = Batch(batch.kind)
            alone.add(item)
            results += await self._step(loop, alone)
        return results

    def _kv_fits(self, batch: Batch, item: WorkItem) -> bool:
        """Whether generation work ``item`` fits the KV-row budget with ``batch`` and the running rows."""
        if item.kind != "generate" or self.max_kv_rows is None:
            return True
        running = self.decoder.kv_rows if self.decoder is not None else 0
        return running + (batch.rows if batch.kind == "generate" else 0) + item.rows <= self.max_kv_rows

    def _take_waiting(self) -> Batch | None:
        """What may run now, coalesced, without waiting for more (decode steps are due).

        Generation work that does not fit the KV rows left waits, and every generation item
        behind it too (in order: the first one waiting is the next admitted once rows free up,
        so it is never starved); scoring, which holds no KV rows, goes past them.
        """
        # blocked: a generation item waits for KV rows, or to join in a larger group
        batch, taken, blocked = None, [], self._held_until() is not None
        for i, item in enumerate(self._waiting):
            if item.kind == "generate" and (
                    blocked or not self._kv_fits(batch if batch is not None else Batch(item.kind), item)):
                blocked = True
                if batch is not None and batch.kind == "generate":
                    break
                continue
            if batch is None:
                batch = Batch(item.kind)
            elif not batch.fits(item, self.max_batch_size, self.max_batch_tokens):
                break  # it heads a later batch
            batch.add(item)
            taken.append(i)
        if batch is None:
            return None
        for i in reversed(taken):
            del self._waiting[i]
        self.metrics.set_work(queued=len(self._waiting))
        return batch

    async def _next_batch(self) -> Batch:
        """Wait for an item, then coalesce up to the size / token budget or ``max_wait``."""
        while not self._waiting or self._paused:
            self._arrived.clear()
            await self._arrived.wait()
        first = self._waiting.popleft()
        batch = Batch(first.kind)
        batch.add(first)
        until = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            if self._waiting:
                if not (batch.fits(self._waiting[0], self.max_batch_size, self.max_batch_tokens)
                        and self._kv_fits(batch, self._waiting[0])):
                    break  # it heads the next batch
                batch.add(self._waiting.popleft())
                continue
            left = until - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        self.metrics.set_work(queued=len(self._waiting))
        return batch

    def _fail_dropped(self, dropped: list[WorkItem]) -> None:
        for item in dropped:
            self.metrics.observe_dropped()
            if not item.future.done():
                item.future.set_exception(RequestTimeout(
                    "the request waited past its deadline; its work was dropped", code="timeout"))
