"""The engine's core and its client with a fake model (no model): batches, failures, timeouts,
aborts, interleaving with decoding, pause, the queue limit and draining; then 429 / 504 /
503-while-loading through a real server. The scheduling policy itself is tested in
tests/test_engine_plan.py."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from server.engine.client import EngineClient, Requests
from server.engine.core import EngineCore, EngineLoop
from server.engine.plan import PlanConfig
from server.engine.protocol import (Abort, AddRequest, EngineOutputs, EngineStats, Failed, Finished, GenWork, Pause,
                                    Resume, Stop, WorkKind)
from server.errors import QueueFull, RequestTimeout
from server.metrics import Metrics
from server.settings import Settings
from server_helpers import Faults, ServerThread, bayesianized, faulty_runner, metric, wait_for
from tfb_core import SamplingParams
from tfb_core.generation import StepResult


@dataclass(eq=False)
class Item:
    """A scoring work item of the fake model: its result is 2 x value."""

    value: int
    id: int = 0
    rows: int = 1
    length: int = 10
    deadline: float = float("inf")
    arrived: float = 0.0
    kind = WorkKind.CHOICE


class FakeDecoder:
    """Sequences that never finish on their own (aborted ones leave); counts its steps."""

    def __init__(self):
        self.seqs, self.steps = [], 0

    @property
    def kv_rows(self):
        return sum(s.params.num_samples for s in self.seqs)

    def admit(self, seqs):
        self.seqs += seqs
        return StepResult(list(seqs))

    def step(self):
        self.steps += 1
        return StepResult(list(self.seqs))

    def step_each(self):
        return self.step()

    def filter(self):
        done = [s for s in self.seqs if s.finished]
        self.seqs = [s for s in self.seqs if not s.finished]
        return done


class FakeRunner:
    """Scores by doubling each item's value (failing a batch that holds ``fail_on``); records each batch."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.made: list[FakeDecoder] = []

    def score(self, kind, items):
        values = [w.value for w in items]
        self.batches.append(values)
        if self.fail_on in values:
            raise RuntimeError("boom")
        return [2 * v for v in values]

    def decoder(self):
        self.made.append(FakeDecoder())
        return self.made[-1]


def make_core(runner=None, **config) -> EngineCore:
    base = dict(max_batch_size=32, max_batch_tokens=16384, max_wait=0.0, max_kv_rows=None, admit_ratio=0.0,
                admit_wait=0.0)
    return EngineCore(runner or FakeRunner(), Metrics("m"), PlanConfig(**{**base, **config}))


def answers(outputs) -> dict:
    return {o.id: (o.result if isinstance(o, Finished) else o.error) for o in outputs}


def generation(id: int, K: int = 2) -> GenWork:
    return GenWork([1, 2, 3], SamplingParams(num_samples=K), "/v1/completions", float("inf"), arrived=0.0, id=id)


# --- the core, stepped by the test ------------------------------------------------------------------


def test_a_step_runs_one_coalesced_batch_and_answers_each_item():
    core = make_core(max_batch_size=4)
    core.add([Item(v, id=v) for v in range(6)])
    assert answers(core.step(now=1.0)) == {v: 2 * v for v in range(4)}
    assert core.depth == 2
    assert answers(core.step(now=1.0)) == {4: 8, 5: 10}
    assert core.runner.batches == [[0, 1, 2, 3], [4, 5]]  # FIFO


def test_a_failed_batch_is_rerun_item_by_item_so_one_bad_item_fails_alone():
    core = make_core(FakeRunner(fail_on=2))
    core.add([Item(v, id=v) for v in (1, 2, 3)])
    out = answers(core.step(now=1.0))
    assert core.runner.batches == [[1, 2, 3], [1], [2], [3]]
    assert out[1] == 2 and out[3] == 6 and isinstance(out[2], RuntimeError)


def test_work_past_its_deadline_is_dropped_with_a_timeout_and_not_run():
    core = make_core()
    core.add([Item(1, id=1, deadline=5.0), Item(2, id=2, deadline=50.0)])
    out = core.step(now=10.0)
    assert core.runner.batches == [[2]]
    [late] = [o for o in out if o.id == 1]
    assert isinstance(late, Failed) and isinstance(late.error, RequestTimeout) and late.error.status == 504


def test_aborted_waiting_work_is_dropped_and_never_answered():
    core = make_core()
    core.add([Item(1, id=1), Item(2, id=2)])
    core.abort([1])
    assert answers(core.step(now=1.0)) == {2: 4} and core.runner.batches == [[2]]


def test_scoring_runs_between_two_decode_steps_and_decoding_goes_on():
    core = make_core()
    core.add([generation(1)])
    assert core.step(now=1.0) == [] and core.active == 1  # admitted, then one decode step
    decoder = core.runner.made[0]
    steps = decoder.steps
    core.add([Item(21, id=2)])
    assert answers(core.step(now=1.0)) == {2: 42}
    assert core.active == 1 and decoder.steps == steps + 1  # the same turn stepped the sequences too
    core.abort([1])
    assert core.step(now=1.0) == [] and core.active == 0 and core.kv_rows == 0  # aborted: it left, unanswered


def test_generation_waits_for_kv_rows_while_scoring_goes_past_it():
    core = make_core(max_kv_rows=4)
    core.add([generation(1, K=3)])
    core.step(now=1.0)
    core.add([generation(2, K=2), Item(5, id=3)])
    assert answers(core.step(now=1.0)) == {3: 10}
    assert core.active == 1 and core.depth == 1  # 3 + 2 rows > 4: it waits
    core.abort([1])
    core.step(now=1.0)  # the first leaves, its rows free up
    core.step(now=1.0)
    assert core.active == 1 and core.depth == 0  # the second joined


# --- the engine's thread and the client --------------------------------------------------------------


class Published:
    """What an EngineLoop publishes, for a test to wait on (no sleeps)."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def __call__(self, outputs: EngineOutputs) -> None:
        self.q.put(outputs)

    def until(self, condition, timeout: float = 30.0) -> EngineOutputs:
        while True:
            outputs = self.q.get(timeout=timeout)
            if condition(outputs):
                return outputs


def test_paused_the_engine_takes_work_into_its_queue_but_runs_nothing_until_resumed():
    runner, published = FakeRunner(), Published()
    engine = EngineLoop(make_core(runner), published)
    engine.start()
    try:
        engine.put(Pause())
        engine.put(AddRequest(1, [Item(1, id=1), Item(2, id=2)]))
        stats = published.until(lambda o: o.stats.seen == 1).stats
        assert stats.depth == 2 and runner.batches == []
        engine.put(Resume())
        done = published.until(lambda o: any(isinstance(x, Finished) for x in o.outputs))
        assert answers(done.outputs) == {1: 2, 2: 4}
    finally:
        engine.put(Stop())
        engine.join(30)


class RecordingClient(EngineClient):
    """An EngineClient whose engine is the test: it records what is sent."""

    def __init__(self, max_queue: int):
        super().__init__(Settings(max_queue=max_queue), Metrics("m"))
        self.sent: list = []

    async def start(self, on_ready=None, on_failed=None, on_status=None) -> None:
        self.requests, self.accepting = Requests(self._abort), True

    def send(self, message) -> None:
        self.sent.append(message)

    async def stop(self) -> None:
        await self.drain()


def test_a_full_queue_raises_all_or_none_from_the_depth_reported_plus_what_was_sent_since():
    async def main():
        client = RecordingClient(max_queue=3)
        await client.start()
        client.submit([Item(0), Item(1)])
        with pytest.raises(QueueFull) as e:
            client.submit([Item(2), Item(3)])  # all or none
        assert e.value.status == 429 and e.value.headers["Retry-After"]
        client.submit([Item(9)])
        assert client.depth == 3 and [type(m) for m in client.sent] == [AddRequest, AddRequest]
        client.apply(EngineOutputs([], EngineStats(depth=1, seen=2)))  # the engine took both, ran two
        assert client.depth == 1

    asyncio.run(main())


def test_a_future_given_up_aborts_its_work_and_drain_waits_for_every_answer():
    async def main():
        client = RecordingClient(max_queue=8)
        await client.start()
        works = [Item(1), Item(2), Item(3)]
        futures = client.submit(works)
        futures[0].cancel()  # its client left
        await asyncio.sleep(0)  # the future's callbacks run on the next turn of the loop
        assert client.sent[-1] == Abort([works[0].id])
        draining = asyncio.create_task(client.drain())
        client.apply(EngineOutputs([Finished(works[1].id, 4)], EngineStats()))
        await asyncio.sleep(0)
        assert not draining.done()  # one left
        client.apply(EngineOutputs([Failed(works[2].id, RuntimeError("x"))], EngineStats()))
        await asyncio.wait_for(draining, 30)
        assert futures[1].result() == 4 and isinstance(futures[2].exception(), RuntimeError)
        with pytest.raises(Exception) as e:
            client.submit([Item(7)])
        assert e.value.status == 503

    asyncio.run(main())


# --- through a real server ------------------------------------------------------------------------

OK = {"question": "q?", "choices": ["a", "b"]}


@pytest.fixture(scope="module")
def post_dir(tmp_path_factory, llama_dir, lora_dir):
    return bayesianized(llama_dir, lora_dir, tmp_path_factory.mktemp("sched") / "post")


def test_queue_full_is_429_with_retry_after(llama_dir, post_dir):
    faults = Faults()
    with ServerThread(model=str(llama_dir), adapter=post_dir, device="cpu", max_queue=2,
                      max_batch_size=1, max_wait_ms=0, runner=faulty_runner(faults)) as srv:
        release = faults.hold()
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
    faults = Faults()
    with ServerThread(model=str(llama_dir), adapter=post_dir, device="cpu", request_timeout=0.3,
                      max_batch_size=1, max_wait_ms=0, runner=faulty_runner(faults)) as srv:
        release = faults.hold()
        with ThreadPoolExecutor(3) as pool:  # one held in the forward, two queued past their deadline
            rs = list(pool.map(lambda _: httpx.post(srv.url + "/v1/choices", json=OK, timeout=30), range(3)))
        assert all(r.status_code == 504 for r in rs), [r.text for r in rs]
        assert rs[0].json()["error"]["type"] == "timeout_error"
        faults.gate = None
        release.set()
        wait_for(lambda: srv.state.engine.idle, what="the held forward finished")
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
