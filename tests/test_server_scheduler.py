"""The scheduler with a fake model step (no model): coalescing, budgets, queue limit, timeouts,
failures, draining; then 429 / 504 / 503-while-loading through a real server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from server.errors import QueueFull, RequestTimeout
from server.metrics import Metrics
from server.scheduler import Batch, Scheduler
from server_helpers import ServerThread, bayesianized, metric, wait_for


@dataclass(eq=False)
class Work:
    value: int
    future: asyncio.Future
    rows: int = 1
    length: int = 10
    deadline: float = float("inf")
    arrived: float = field(default_factory=time.monotonic)
    kind: str = "choice"


class FakeStep:
    """Records each batch's values; doubles them; optionally fails, or holds each forward until
    ``release`` is set (``entered`` tells the test a forward is running)."""

    def __init__(self, fail_on: int | None = None, hold: bool = False):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, batch: Batch) -> list:
        values = [w.value for w in batch.items]
        self.batches.append(values)
        self.entered.set()
        assert self.release.wait(30), "the test never released the forward"
        if self.fail_on in values:
            raise RuntimeError("boom")
        return [2 * v for v in values]


def run(coro):
    return asyncio.run(coro)


async def submit_all(sched, values, **kw):
    loop = asyncio.get_running_loop()
    works = [Work(v, loop.create_future(), **kw) for v in values]
    sched.submit(works)
    return works


def test_coalesces_up_to_batch_size():
    async def main():
        step = FakeStep()
        sched = Scheduler(step, Metrics("m"), max_batch_size=4, max_wait_ms=20)
        sched.start()
        works = await submit_all(sched, range(10))
        out = await sched.wait(works, 10)
        await sched.stop()
        return step.batches, out

    batches, out = run(main())
    assert out == [2 * v for v in range(10)]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum(batches, []) == list(range(10))  # FIFO


def test_token_budget_and_a_big_item_alone():
    async def main():
        step = FakeStep()
        sched = Scheduler(step, Metrics("m"), max_batch_size=32, max_batch_tokens=100, max_wait_ms=20)
        sched.start()
        loop = asyncio.get_running_loop()
        works = [Work(0, loop.create_future(), rows=4, length=10),  # 40
                 Work(1, loop.create_future(), rows=4, length=12),  # (8 x 12) = 96 fits
                 Work(2, loop.create_future(), rows=1, length=10),  # 9 x 12 = 108: next batch
                 Work(3, loop.create_future(), rows=50, length=50)]  # 2500 alone
        sched.submit(works)
        await sched.wait(works, 10)
        await sched.stop()
        return step.batches

    assert run(main()) == [[0, 1], [2], [3]]


def test_queue_full_raises_and_keeps_the_queue():
    async def main():
        sched = Scheduler(FakeStep(), Metrics("m"), max_queue=3)  # not started: nothing drains
        sched._arrived = asyncio.Event()
        sched._accepting = True
        await submit_all(sched, range(2))
        with pytest.raises(QueueFull) as e:
            await submit_all(sched, range(2))  # all or none
        assert e.value.status == 429 and e.value.headers["Retry-After"]
        await submit_all(sched, [9])
        return sched.depth

    assert run(main()) == 3


def test_timed_out_work_is_dropped_before_the_forward():
    async def main():
        step = FakeStep(hold=True)
        sched = Scheduler(step, Metrics("m"), max_batch_size=1, max_wait_ms=0)
        sched.start()
        first = await submit_all(sched, [1])
        assert await asyncio.to_thread(step.entered.wait, 30)  # 1 is in the forward
        late = await submit_all(sched, [2])
        with pytest.raises(RequestTimeout):
            await sched.wait(late, 0.1)
        step.release.set()
        assert await sched.wait(first, 5) == [2]
        after = await submit_all(sched, [3])
        assert await sched.wait(after, 5) == [6]
        await sched.stop()
        return step.batches

    assert run(main()) == [[1], [3]]  # 2 never ran


def test_a_failed_step_fails_its_batch_only():
    async def main():
        sched = Scheduler(FakeStep(fail_on=1), Metrics("m"), max_batch_size=1, max_wait_ms=0)
        sched.start()
        bad = await submit_all(sched, [1])
        with pytest.raises(RuntimeError):
            await sched.wait(bad, 5)
        good = await submit_all(sched, [2])
        out = await sched.wait(good, 5)
        await sched.stop()
        return out

    assert run(main()) == [4]


def test_a_failed_batch_is_rerun_item_by_item_so_one_bad_item_fails_alone():
    async def main():
        step = FakeStep(fail_on=2)
        sched = Scheduler(step, Metrics("m"), max_batch_size=8, max_wait_ms=20)
        sched.start()
        works = await submit_all(sched, [1, 2, 3])
        results = await asyncio.gather(*(w.future for w in works), return_exceptions=True)
        await sched.stop()
        return step.batches, results

    batches, results = run(main())
    assert batches == [[1, 2, 3], [1], [2], [3]]
    assert results[0] == 2 and results[2] == 6 and isinstance(results[1], RuntimeError)


def test_drain_finishes_outstanding_then_refuses():
    async def main():
        step = FakeStep(hold=True)
        sched = Scheduler(step, Metrics("m"), max_batch_size=2, max_wait_ms=0)
        sched.start()
        works = await submit_all(sched, range(5))
        assert await asyncio.to_thread(step.entered.wait, 30)
        draining = asyncio.create_task(sched.drain())
        await asyncio.sleep(0)
        assert not draining.done() and not all(w.future.done() for w in works)
        step.release.set()
        await draining
        assert all(w.future.done() for w in works)
        with pytest.raises(Exception) as e:
            await submit_all(sched, [7])
        assert e.value.status == 503
        await sched.stop()

    run(main())


# --- through a real server ------------------------------------------------------------------------

OK = {"question": "q?", "choices": ["a", "b"]}


@pytest.fixture(scope="module")
def post_dir(tmp_path_factory, llama_dir, lora_dir):
    return bayesianized(llama_dir, lora_dir, tmp_path_factory.mktemp("sched") / "post")


def hold_forwards(srv: ServerThread) -> tuple[threading.Event, object]:
    """Make every forward wait for the returned event; returns (release, the original step)."""
    step, release = srv.state.scheduler.step, threading.Event()

    def held(batch):
        assert release.wait(30), "the test never released the forward"
        return step(batch)

    srv.state.scheduler.step = held
    return release, step


def test_queue_full_is_429_with_retry_after(llama_dir, post_dir):
    with ServerThread(model=str(llama_dir), adapter=post_dir, device="cpu", max_queue=2,
                      max_batch_size=1, max_wait_ms=0) as srv:
        release, _ = hold_forwards(srv)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, srv.url + "/v1/choices", json=OK, timeout=30) for _ in range(8)]
            # one in the held forward, two queued: the other five are refused at once
            wait_for(lambda: sum(f.done() for f in futures) >= 5, what="five requests refused")
            release.set()
            rs = [f.result() for f in futures]
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and 200 in codes, codes
        r429 = next(r for r in rs if r.status_code == 429)
        assert r429.headers["Retry-After"] and r429.json()["error"]["type"] == "rate_limit_error"
        assert httpx.post(srv.url + "/v1/choices", json=OK, timeout=30).status_code == 200


def test_request_past_timeout_is_504_and_server_keeps_serving(llama_dir, post_dir):
    with ServerThread(model=str(llama_dir), adapter=post_dir, device="cpu", request_timeout=0.3,
                      max_batch_size=1, max_wait_ms=0) as srv:
        release, fast = hold_forwards(srv)
        with ThreadPoolExecutor(3) as pool:  # one held in the forward, two queued past their deadline
            rs = list(pool.map(lambda _: httpx.post(srv.url + "/v1/choices", json=OK, timeout=30), range(3)))
        assert all(r.status_code == 504 for r in rs), [r.text for r in rs]
        assert rs[0].json()["error"]["type"] == "timeout_error"
        srv.state.scheduler.step = fast
        release.set()
        wait_for(lambda: srv.state.scheduler.idle, what="the held forward finished")
        # it goes on serving (under a 0.3 s timeout a loaded machine may still answer 504 at first)
        wait_for(lambda: httpx.post(srv.url + "/v1/choices", json=OK, timeout=30).status_code == 200,
                 what="a 200 after the timeouts")
        assert metric(srv, "tfb_dropped_items_total") >= 1  # queued work was dropped, not run


def test_health_503_while_loading_then_200(llama_dir, post_dir):
    from server import loader

    release = threading.Event()

    def slow_load(settings, set_status):
        release.wait(30)
        return loader.load(settings, set_status)

    srv = ServerThread(load=slow_load, settings=None, model=str(llama_dir), adapter=post_dir, device="cpu")
    srv.start(wait=False)
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/choices", json=OK)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        release.set()
        wait_for(lambda: httpx.get(srv.url + "/health").status_code == 200, what="/health 200 after loading")
        assert httpx.post(srv.url + "/v1/choices", json=OK, timeout=60).status_code == 200
    finally:
        release.set()
        srv.stop()


class SpinningDecoder:
    """A decoder that stays active until ``stop`` is set; each step takes ~1 ms of 'compute'."""

    kv_rows = 1

    def __init__(self):
        self.steps = 0
        self.stop = threading.Event()
        self.fifty = threading.Event()

    @property
    def active(self) -> int:
        return 0 if self.stop.is_set() else 1

    def step(self) -> None:
        self.steps += 1
        if self.steps >= 50:
            self.fifty.set()
        time.sleep(0.001)  # stands in for the GPU's step, not for synchronisation

    def fail(self, error) -> None:
        raise AssertionError(f"no step fails here: {error}")


def test_decode_steps_run_back_to_back_without_the_event_loop_and_new_work_cuts_in():
    """With sequences active, the worker steps on while the event loop is blocked (the loop is
    not between one step and the next); work submitted meanwhile is run between two steps."""
    async def main():
        dec = SpinningDecoder()
        step = FakeStep()
        sched = Scheduler(step, Metrics("m"), max_wait_ms=0, decoder=dec)
        sched.start()
        try:
            while dec.steps == 0:  # the decode turn has started on the worker
                await asyncio.sleep(0.001)
            assert dec.fifty.wait(30), f"only {dec.steps} steps ran while the event loop was blocked"
            [got] = await sched.wait(await submit_all(sched, [21]), 30)
            assert got == 42 and step.batches == [[21]] and dec.active == 1  # decoding went on
            before = dec.steps
            while dec.steps == before:  # and steps resume after the scoring batch
                await asyncio.sleep(0.001)
        finally:
            dec.stop.set()
            await sched.stop()

    run(main())


def test_work_left_waiting_or_submitted_during_a_forward_is_not_held_behind_decoding():
    """While sequences decode: a scoring item submitted during another item's forward, and one
    queued behind a generation item (another kind, so another batch), are answered without
    waiting for the decoding to end."""
    async def main():
        dec = SpinningDecoder()
        step = FakeStep(hold=True)
        sched = Scheduler(step, Metrics("m"), max_wait_ms=0, decoder=dec)
        sched.start()
        try:
            first = await submit_all(sched, [1])
            assert await asyncio.to_thread(step.entered.wait, 30)  # the first forward runs
            second = await submit_all(sched, [2])  # submitted during it
            step.release.set()
            assert await sched.wait(first + second, 30) == [2, 4]
            loop = asyncio.get_running_loop()
            gen = Work(3, loop.create_future(), kind="generate")
            score = Work(4, loop.create_future())
            sched.submit([gen, score])  # one tick: two batches of two kinds
            assert await sched.wait([gen, score], 30) == [6, 8]
            assert dec.active == 1  # decoding never stopped
        finally:
            dec.stop.set()
            await sched.stop()

    run(main())


class PausingDecoder(SpinningDecoder):
    """A :class:`SpinningDecoder` that pauses its scheduler from the worker thread at step 10."""

    def __init__(self):
        super().__init__()
        self.scheduler = None
        self.paused = threading.Event()

    def step(self) -> None:
        super().step()
        if self.steps == 10:
            self.scheduler.pause()
            self.paused.set()


def test_pause_holds_new_work_and_decode_steps_until_resume():
    """Paused (here from the worker thread, mid-decoding): no step after the one running, work
    submitted meanwhile stays queued; resumed, the work runs and decoding goes on."""
    async def main():
        dec, step = PausingDecoder(), FakeStep()
        sched = Scheduler(step, Metrics("m"), max_wait_ms=0, decoder=dec)
        dec.scheduler = sched
        sched.start()
        try:
            assert await asyncio.to_thread(dec.paused.wait, 30)
            works = await submit_all(sched, [1, 2])
            for _ in range(20):  # turns of the event loop, where the scheduler would take them
                await asyncio.sleep(0)
            assert step.batches == [] and sched.depth == 2
            assert dec.steps == 10  # no step after the one that paused
            sched.resume()
            assert await sched.wait(works, 30) == [2, 4]
            while dec.steps == 10:  # and decoding goes on
                await asyncio.sleep(0.001)
        finally:
            sched.resume()  # a paused scheduler never drains
            dec.stop.set()
            await sched.stop()

    run(main())


class BusyDecoder(SpinningDecoder):
    """A :class:`SpinningDecoder` with ``n`` active sequences."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    @property
    def active(self) -> int:
        return 0 if self.stop.is_set() else self.n


@contextlib.asynccontextmanager
async def busy_scheduler(admit_wait_ms: float):
    """A scheduler (admit_ratio 0.3) over 10 sequences decoding: (decoder, step, scheduler)."""
    dec, step = BusyDecoder(10), FakeStep()
    sched = Scheduler(step, Metrics("m"), max_wait_ms=0, decoder=dec, admit_ratio=0.3, admit_wait_ms=admit_wait_ms)
    sched.start()
    try:
        while dec.steps == 0:  # the decode turn has started on the worker
            await asyncio.sleep(0.001)
        yield dec, step, sched
    finally:
        dec.stop.set()
        await sched.stop()


def test_generation_joins_running_sequences_in_groups_and_scoring_goes_past():
    """With 10 sequences decoding and admit_ratio 0.3, generation work waits until 3 wait, then
    joins in one batch; a scoring item submitted meanwhile is answered at once."""
    async def main():
        async with busy_scheduler(admit_wait_ms=60_000) as (dec, step, sched):
            loop = asyncio.get_running_loop()
            gens = [Work(v, loop.create_future(), kind="generate") for v in (1, 2, 3)]
            for g in gens[:2]:
                sched.submit([g])
                before = dec.steps
                while dec.steps < before + 20:  # decoding goes on, the work waits
                    await asyncio.sleep(0.001)
            assert step.batches == [] and sched.depth == 2
            assert await sched.wait(await submit_all(sched, [9]), 30) == [18]  # scoring is not held
            sched.submit([gens[2]])
            assert await sched.wait(gens, 30) == [2, 4, 6]
            assert step.batches == [[9], [1, 2, 3]]  # the three joined in one batch

    run(main())


def test_held_generation_joins_once_the_oldest_waited_admit_wait_ms():
    """A lone generation request behind busy decoding joins by itself after admit_wait_ms, with
    no other event to wake the scheduler; not before."""
    async def main():
        async with busy_scheduler(admit_wait_ms=80) as (dec, step, sched):
            gen = Work(5, asyncio.get_running_loop().create_future(), kind="generate")
            sched.submit([gen])
            assert await sched.wait([gen], 30) == [10]
            waited = time.monotonic() - gen.arrived
            assert waited >= 0.08 and step.batches == [[5]] and dec.active == 10

    run(main())
