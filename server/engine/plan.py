"""Which waiting work runs next: the engine's scheduling policy, as a pure function.

:func:`plan` looks at the waiting work (in arrival order), the running sequences and the
budgets, at time ``now``, and answers with a :class:`Plan`: the items whose deadline passed,
the batch to run now (items of one kind: a scoring forward, or generation to admit), and
when to look again if it chose to wait. It reads no clock, starts no thread and changes
nothing, so it is tested with plain lists and numbers (tests/test_engine_plan.py).

The policy:

- A batch holds items of one kind, up to ``max_batch_size`` items and ``max_batch_tokens``
  padded tokens (rows x longest row); an item larger than that runs alone.
- With nothing decoding, the oldest item heads a batch and the items behind it join in order;
  if all of them joined and the batch is not full, it waits for more until ``max_wait`` after
  the oldest arrived.
- While sequences decode, what is waiting joins between two steps without waiting.
  Generation holds KV rows (each sequence its ``kv_rows``: K, fewer with a shared trunk; at
  most ``max_kv_rows`` running and being admitted): an item that does not fit waits, and
  every generation item behind it too (it is admitted first once rows free up, so it is never
  starved); scoring goes past it.
- With ``admit_ratio`` > 0, while sequences decode, waiting generation joins in groups (as
  TGI's ``waiting_served_ratio``): once ``admit_ratio`` x the running sequences wait (at most
  a full batch), or the oldest has waited ``admit_wait``. A prefill forward costs about one
  decode step on a GPU however few prompts it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .protocol import Work, WorkKind


@dataclass(frozen=True)
class PlanConfig:
    """The budgets of :func:`plan`; :meth:`of_settings` is the one place they are read (no defaults here)."""

    max_batch_size: int
    max_batch_tokens: int
    max_wait: float  # seconds
    max_kv_rows: int | None
    admit_ratio: float
    admit_wait: float  # seconds

    @classmethod
    def of_settings(cls, settings) -> "PlanConfig":
        """The budgets ``settings`` (``tfb serve``'s flags) describe."""
        s = settings
        return cls(s.max_batch_size, s.max_batch_tokens, s.max_wait_ms / 1000, s.max_kv_rows, s.admit_ratio,
                   s.admit_wait_ms / 1000)


@dataclass(frozen=True)
class Running:
    """The decode batch as the plan sees it."""

    sequences: int = 0
    kv_rows: int = 0


@dataclass
class Plan:
    kind: WorkKind | None = None
    batch: list[Work] = field(default_factory=list)  # to run now, in arrival order
    expired: list[Work] = field(default_factory=list)  # past their deadline: dropped
    wake_at: float | None = None  # work waits (to coalesce, or to join in a group) until then


@dataclass
class _Batch:
    kind: WorkKind
    items: list[Work] = field(default_factory=list)
    rows: int = 0
    length: int = 0
    kv_rows: int = 0  # generation's

    def fits(self, item: Work, config: PlanConfig) -> bool:
        """Whether ``item`` may join; an empty batch takes any item."""
        if not self.items:
            return True
        return (item.kind is self.kind and len(self.items) < config.max_batch_size
                and (self.rows + item.rows) * max(self.length, item.length) <= config.max_batch_tokens)

    def add(self, item: Work) -> None:
        self.items.append(item)
        self.rows += item.rows
        self.length = max(self.length, item.length)
        if item.kind is WorkKind.GENERATE:
            self.kv_rows += item.kv_rows


def plan(waiting: Sequence[Work], running: Running, config: PlanConfig, now: float) -> Plan:
    """What runs next (see the module's docstring)."""
    expired = [w for w in waiting if now >= w.deadline]
    live = [w for w in waiting if now < w.deadline]
    if not live:
        return Plan(expired=expired)
    if running.sequences == 0:
        return _idle(live, running, config, now, expired)
    held = held_until(live, running, config, now)
    batch, blocked = None, held is not None  # blocked: generation waits (for KV rows, or to join in a group)
    for item in live:
        if item.kind is WorkKind.GENERATE and (blocked or not kv_fits(batch, item, running, config)):
            blocked = True
            if batch is not None and batch.kind is WorkKind.GENERATE:
                break
            continue  # scoring behind it may run
        if batch is None:
            batch = _Batch(item.kind)
        elif not batch.fits(item, config):
            break  # it heads a later batch
        batch.add(item)
    if batch is None:
        return Plan(expired=expired, wake_at=held)
    return Plan(batch.kind, batch.items, expired, held)


def _idle(live: list[Work], running: Running, config: PlanConfig, now: float, expired: list[Work]) -> Plan:
    """Nothing decodes: the oldest heads a batch, the ones behind it join while they fit; a batch
    that took everything and has room waits for more until ``max_wait`` after the oldest arrived."""
    batch = _Batch(live[0].kind)
    batch.add(live[0])
    for item in live[1:]:
        if not (batch.fits(item, config) and kv_fits(batch, item, running, config)):
            return Plan(batch.kind, batch.items, expired)  # it heads the next batch
        batch.add(item)
    due = live[0].arrived + config.max_wait
    if len(batch.items) < config.max_batch_size and now < due:
        return Plan(expired=expired, wake_at=due)
    return Plan(batch.kind, batch.items, expired)


def kv_fits(batch: _Batch | None, item: Work, running: Running, config: PlanConfig) -> bool:
    """Whether generation work ``item`` fits the KV-row budget with ``batch`` and the running rows."""
    if item.kind is not WorkKind.GENERATE or config.max_kv_rows is None:
        return True
    joining = batch.kv_rows if batch is not None else 0
    return running.kv_rows + joining + item.kv_rows <= config.max_kv_rows


def held_until(live: Sequence[Work], running: Running, config: PlanConfig, now: float) -> float | None:
    """When waiting generation that waits to join the running sequences in a larger group is due
    (None: none waits so)."""
    if config.admit_ratio <= 0 or running.sequences == 0:
        return None
    group = min(math.floor(config.admit_ratio * running.sequences), config.max_batch_size)
    generation = [w for w in live if w.kind is WorkKind.GENERATE]
    if not generation or len(generation) >= group:
        return None
    due = generation[0].arrived + config.admit_wait
    return due if now < due else None
