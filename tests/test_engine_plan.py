"""The scheduling policy (server/engine/plan.py) with plain lists and a fake clock: no threads, no sleeps."""

from dataclasses import dataclass

import pytest

from server.engine.plan import Plan, PlanConfig, Running, plan
from server.engine.protocol import WorkKind


@dataclass(eq=False)
class Item:
    kind: WorkKind
    rows: int = 1  # prefill rows (K for generation): the token budget
    length: int = 10
    arrived: float = 0.0
    deadline: float = 100.0
    id: int = 0
    kv_rows: int = 0  # generation: the KV rows it holds (0: its rows)

    def __post_init__(self):
        self.kv_rows = self.kv_rows or self.rows


def config(**kw) -> PlanConfig:
    base = dict(max_batch_size=32, max_batch_tokens=16384, max_wait=0.0, max_kv_rows=None, admit_ratio=0.0,
                admit_wait=0.0)
    return PlanConfig(**{**base, **kw})


def choice(**kw) -> Item:
    return Item(WorkKind.CHOICE, **kw)


def gen(**kw) -> Item:
    return Item(WorkKind.GENERATE, **kw)


IDLE = Running(0, 0)


def test_nothing_waiting_plans_nothing():
    assert plan([], IDLE, config(), now=1.0) == Plan()


def test_idle_coalesces_what_waits_up_to_the_batch_size():
    waiting = [choice(id=i) for i in range(5)]
    p = plan(waiting, IDLE, config(max_batch_size=3), now=1.0)
    assert p.kind is WorkKind.CHOICE and p.batch == waiting[:3] and p.wake_at is None


def test_a_batch_holds_one_kind_and_stops_at_the_first_other():
    waiting = [choice(), choice(), gen(), choice()]
    p = plan(waiting, IDLE, config(), now=1.0)
    assert p.batch == waiting[:2]


def test_the_token_budget_counts_rows_times_the_longest_row():
    waiting = [choice(rows=4, length=10), choice(rows=4, length=20), choice(rows=1, length=10)]
    assert plan(waiting, IDLE, config(max_batch_tokens=160), now=1.0).batch == waiting[:2]  # 8 x 20 = 160
    assert plan(waiting, IDLE, config(max_batch_tokens=159), now=1.0).batch == waiting[:1]


def test_an_item_above_the_token_budget_runs_alone():
    big = choice(rows=100, length=100)
    assert plan([big, choice()], IDLE, config(max_batch_tokens=10), now=1.0).batch == [big]


@pytest.mark.parametrize("now, runs", [(1.0, False), (1.049, False), (1.05, True)])
def test_idle_waits_max_wait_after_the_oldest_arrived_for_more(now, runs):
    waiting = [choice(arrived=1.0), choice(arrived=1.01)]
    p = plan(waiting, IDLE, config(max_wait=0.05), now=now)
    if runs:
        assert p.batch == waiting and p.wake_at is None
    else:
        assert p.batch == [] and p.wake_at == pytest.approx(1.05)


def test_a_full_batch_or_one_cut_short_by_another_kind_does_not_wait():
    full = [choice(arrived=1.0), choice(arrived=1.0)]
    assert plan(full, IDLE, config(max_wait=10, max_batch_size=2), now=1.0).batch == full
    mixed = [choice(arrived=1.0), gen(arrived=1.0)]
    assert plan(mixed, IDLE, config(max_wait=10), now=1.0).batch == mixed[:1]


def test_expired_work_is_dropped_and_not_run():
    late, ok = choice(deadline=1.0), choice(deadline=5.0)
    p = plan([late, ok], IDLE, config(), now=2.0)
    assert p.expired == [late] and p.batch == [ok]


def test_while_decoding_generation_that_does_not_fit_the_kv_rows_waits_and_scoring_goes_past():
    waiting = [gen(rows=8), gen(rows=1), choice()]
    p = plan(waiting, Running(sequences=2, kv_rows=60), config(max_kv_rows=64), now=1.0)
    # the first generation item needs 8 rows, 4 are left: it and every generation behind it wait
    assert p.kind is WorkKind.CHOICE and p.batch == [waiting[2]]


def test_generation_holds_its_kv_rows_and_prefills_its_rows():
    """A shared trunk: K = 10 rows in the prefill (the token budget) but 3 KV rows held (the KV
    budget): three join a budget of 10 KV rows that K rows each would not; the token budget
    still counts 10 rows each."""
    waiting = [gen(rows=10, kv_rows=3) for _ in range(4)]
    p = plan(waiting, Running(sequences=1, kv_rows=1), config(max_kv_rows=10), now=1.0)
    assert p.batch == waiting[:3]  # 1 + 3 x 3 = 10; a fourth would need 13
    p = plan(waiting, Running(sequences=1, kv_rows=1), config(max_kv_rows=100, max_batch_tokens=20 * 10), now=1.0)
    assert p.batch == waiting[:2]  # 2 x 10 rows x 10 tokens fill the token budget


def test_while_decoding_generation_joins_as_far_as_the_kv_rows_go():
    waiting = [gen(rows=2), gen(rows=2), gen(rows=2)]
    p = plan(waiting, Running(sequences=1, kv_rows=2), config(max_kv_rows=6), now=1.0)
    assert p.kind is WorkKind.GENERATE and p.batch == waiting[:2]  # 2 + 2 + 2 = 6; a third would need 8


def test_while_decoding_work_joins_without_waiting_for_more():
    waiting = [choice(arrived=1.0)]
    p = plan(waiting, Running(1, 1), config(max_wait=10), now=1.0)
    assert p.batch == waiting


def test_admit_ratio_holds_generation_until_a_group_waits_or_the_oldest_waited_admit_wait():
    cfg = config(admit_ratio=0.5, admit_wait=0.1)
    running = Running(sequences=8, kv_rows=8)  # a group is 4
    three = [gen(arrived=1.0), gen(arrived=1.0), gen(arrived=1.0)]
    held = plan(three, running, cfg, now=1.05)
    assert held.batch == [] and held.wake_at == pytest.approx(1.1)
    assert plan(three, running, cfg, now=1.1).batch == three  # the oldest waited admit_wait
    four = three + [gen(arrived=1.04)]
    assert plan(four, running, cfg, now=1.05).batch == four  # a group waits
    assert plan(three, IDLE, cfg, now=1.0).batch == three  # nothing decodes: at once


def test_held_generation_lets_scoring_behind_it_run():
    cfg = config(admit_ratio=1.0, admit_wait=10)
    waiting = [gen(arrived=1.0), choice(arrived=1.0)]
    p = plan(waiting, Running(sequences=4, kv_rows=4), cfg, now=1.0)
    assert p.batch == [waiting[1]] and p.wake_at == pytest.approx(11.0)


def test_the_config_is_read_from_the_settings():
    from server.settings import Settings

    s = Settings(max_batch_size=7, max_batch_tokens=99, max_wait_ms=5, max_kv_rows=12, admit_ratio=0.5,
                 admit_wait_ms=250)
    assert PlanConfig.of_settings(s) == PlanConfig(7, 99, 0.005, 12, 0.5, 0.25)
