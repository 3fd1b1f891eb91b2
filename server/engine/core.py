"""The engine: the model's runner, the waiting work and the running decode batch, stepped by one thread.

:class:`ModelRunner` owns the posterior and its :class:`tfb_core.Engine` (the forwards
``--engine`` picks): it scores a batch of :class:`ChoiceWork` in ONE forward over items x choices x K
rows (through the static prefill engine on CUDA) and reduces each item's (K, C)
probabilities to the model average and its entropy split, or scores echoed prompts token by token.

:class:`EngineCore` holds what waits and what decodes; :meth:`EngineCore.step` is one turn:
drop expired work, run a scoring batch or admit new sequences (:func:`~server.engine.plan.plan`
says which), then one decode step of every running sequence; it returns what the turn produced
for each work item (:class:`TokenDelta`, :class:`Finished`, :class:`Failed`). A finished,
timed-out or aborted sequence leaves at the next step boundary and its KV rows are freed.

:class:`EngineLoop` runs a core on a thread of its own: inputs (:class:`AddRequest`,
:class:`Abort`, ...) from any thread, outputs handed to ``publish`` once per turn.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from tfb_core import Decoder, Engine, GenSequence, TokenInfo

from ..errors import BadRequest, RequestTimeout, as_api_error
from ..loader import Loaded, load, resolve_settings
from ..metrics import Metrics, Timer
from .plan import PlanConfig, Running, plan
from .protocol import (Abort, AddRequest, ChoiceOutput, ChoiceWork, EngineInput, EngineOutputs, EngineStats,
                       Failed, Finished, GenWork, Generated, Output, Pause, Resume, ScoreWork, Stop, TokenDelta,
                       Work, WorkKind)

log = logging.getLogger(__name__)


class ModelRunner:
    """Owns the posterior and its forwards; used by the engine's thread only."""

    def __init__(self, loaded: Loaded, metrics: Metrics, engine: str = "auto"):
        self.post = loaded.post
        self.metrics = metrics
        try:
            self.model = Engine(self.post, engine)  # its forwards: static kernels on CUDA, else eager
        except ValueError as e:
            raise ValueError(f"--engine {engine}: {e}; use auto or eager") from None
        self.kind = self.model.kind  # "static" or "eager"

    def score(self, kind: WorkKind, items: list) -> list:
        """One result per item (an Exception fails that item only)."""
        match kind:
            case WorkKind.CHOICE:
                return self.choices_step(items)
            case WorkKind.SCORE:
                return self.score_step(items)
        raise ValueError(f"no scoring forward for work of kind {kind!r}")

    def decoder(self) -> Decoder:
        """A fresh decoder (static KV cache and CUDA graphs, or eager); new prompts run through
        the scoring engine's graphs on CUDA."""
        return self.model.decoder()

    def score_step(self, items: list[ScoreWork]) -> list[list[TokenInfo] | Exception]:
        """Prompts scored token by token in ONE forward over their K rows each."""
        with Timer() as t:
            scored = self.model.score_prompts([w.prompt_ids for w in items], [(w.seed, w.num_samples) for w in items],
                                              max(w.top_logprobs for w in items))
        self.metrics.observe_batch(len(items), sum(w.rows for w in items), t.seconds,
                                   sum(len(w.prompt_ids) for w in items))
        outputs = []
        for w, tokens in zip(items, scored):
            if not all(math.isfinite(x) for t in tokens for x in (t.logprob, t.predictive_entropy, t.expected_entropy)):
                outputs.append(BadRequest("the model's next-token distributions for this prompt are not finite (NaN "
                                          "or infinite logits); it was stopped alone", code="non_finite_distribution"))
                continue
            for t in tokens:  # each prompt its own number of alternatives
                del t.top[w.top_logprobs:]
            outputs.append(tokens)
        return outputs

    def choices_step(self, items: list[ChoiceWork]) -> list[ChoiceOutput | Exception]:
        with Timer() as t:
            per_item = self.model.score([w.encoded for w in items],
                                        [(w.seed, w.num_samples) for w in items])  # [(K_i, C_i)]
        self.metrics.observe_batch(len(items), sum(w.rows for w in items), t.seconds,
                                   sum(w.encoded.prompt_tokens for w in items))
        outputs = []
        for sample_probs in per_item:
            if not torch.isfinite(sample_probs).all():  # this item's forward went non-finite: it alone fails
                outputs.append(BadRequest("the model's choice probabilities for this item are not finite (NaN "
                                          "or infinite logits); it was stopped alone",
                                          code="non_finite_distribution"))
                continue
            u = self.model.uncertainty(sample_probs)  # (1, C), (1,)
            outputs.append(ChoiceOutput(sample_probs, u.probs[0], u.predictive_entropy.item(),
                                        u.expected_entropy.item(), u.mutual_information.item()))
        return outputs


MakeRunner = Callable[[Loaded, Metrics, str], ModelRunner]


def load_engine(settings, metrics: Metrics, load=load, set_status=lambda status: None,
                runner: MakeRunner = ModelRunner) -> tuple[Loaded, object, ModelRunner]:
    """Load the posterior ``settings`` describe, fill in what it decides (K) and make its
    runner with ``runner(loaded, metrics, engine kind)``: (loaded, the settings, the runner)."""
    loaded = load(settings, set_status)
    settings = resolve_settings(settings, loaded.post)
    return loaded, settings, runner(loaded, metrics, settings.engine_kind)


@dataclass(eq=False)
class _Sequence:
    """A running generation: its work and the engine's own state of it."""

    work: GenWork
    seq: GenSequence
    sent: int = 0  # characters of its text already sent
    last_token_at: float | None = None
    aborted: bool = False


class EngineCore:
    """The waiting work and the running decode batch; every method runs on one thread."""

    def __init__(self, runner: ModelRunner, metrics: Metrics, config: PlanConfig):
        self.runner, self.metrics, self.config = runner, metrics, config
        self.waiting: deque[Work] = deque()
        self.decoder: Decoder | None = None  # made at the first admission, then kept (buffers, graphs)
        self.sequences: dict[int, _Sequence] = {}  # id(seq) -> the running generation
        self.wake_at: float | None = None  # the last plan waited for more work until then

    @property
    def active(self) -> int:
        return len(self.decoder.seqs) if self.decoder is not None else 0

    @property
    def kv_rows(self) -> int:
        return self.decoder.kv_rows if self.decoder is not None else 0

    @property
    def depth(self) -> int:
        return len(self.waiting)

    def add(self, works: list[Work]) -> None:
        self.waiting.extend(works)
        self.metrics.set_work(queued=len(self.waiting))

    def abort(self, ids: list[int]) -> None:
        """Drop waiting work, and end running sequences at the next step (nothing is answered)."""
        gone = set(ids)
        kept = [w for w in self.waiting if w.id not in gone]
        for _ in range(len(self.waiting) - len(kept)):
            self.metrics.observe_dropped()
        self.waiting = deque(kept)
        for s in self.sequences.values():
            if s.work.id in gone:
                s.aborted = True
                if not s.seq.finished:  # it leaves at the next boundary (a join or a step)
                    s.seq.finish_reason = "cancelled"
        self.metrics.set_work(queued=len(self.waiting))

    def next_turn_at(self) -> float | None:
        """When :meth:`step` has something to do (0: now; None: not before new work)."""
        if self.active:
            return 0.0
        if not self.waiting:
            return None
        return self.wake_at or 0.0

    def step(self, now: float | None = None) -> list[Output]:
        """One turn: a scoring batch or an admission, then one decode step of every running sequence."""
        return self.run_planned(now) + self.decode()

    def run_planned(self, now: float | None = None) -> list[Output]:
        """The first half of a turn: drop expired work, run what :func:`plan` says (a scoring
        forward, or an admission with its first tokens)."""
        now = time.monotonic() if now is None else now
        p = plan(self.waiting, Running(self.active, self.kv_rows), self.config, now)
        self.wake_at = p.wake_at
        self._take(p.expired + p.batch, now)
        outputs: list[Output] = []
        for w in p.expired:
            self.metrics.observe_dropped()
            outputs.append(Failed(w.id, RequestTimeout("the request waited past its deadline; its work was dropped",
                                                       code="timeout")))
        if p.batch:
            self.metrics.set_work(running=len(p.batch) + self.active)
            outputs += self._admit(p.batch) if p.kind is WorkKind.GENERATE else self._score(p.kind, p.batch)
            self.metrics.set_work(running=self.active)
        return outputs

    def decode(self) -> list[Output]:
        """The second half of a turn: one decode step of every running sequence (none: nothing)."""
        if not self.active:
            return []
        self.metrics.set_work(running=self.active)
        try:
            outputs = self._decode()
        except Exception as e:  # past what the decoder reruns sequence by sequence
            log.exception("decode step of %d sequences failed", self.active)
            outputs = self.fail(as_api_error(e))
        self.metrics.set_work(running=self.active)
        return outputs

    def fail(self, error: Exception) -> list[Output]:
        """Every running sequence fails with ``error``; the KV rows are freed."""
        sequences, self.sequences = list(self.sequences.values()), {}
        self.decoder = None  # its state may be half-stepped: the next admission starts a fresh one
        self.metrics.set_work(kv_rows=0)
        return [Failed(s.work.id, error) for s in sequences if not s.aborted]

    # --- the parts of a turn ---------------------------------------------------------------------

    def _take(self, works: list[Work], now: float) -> None:
        """Take ``works`` out of the queue; the ones that run are timed (their queue wait)."""
        if not works:
            return
        taken = {id(w) for w in works}
        self.waiting = deque(w for w in self.waiting if id(w) not in taken)
        self.metrics.set_work(queued=len(self.waiting))
        for w in works:
            if now < w.deadline:
                self.metrics.observe_queue_wait(now - w.arrived)

    def _score(self, kind: WorkKind, items: list[Work]) -> list[Output]:
        """One forward; if it fails, each item again alone, so one bad item fails one request."""
        try:
            results = self.runner.score(kind, items)
        except Exception as e:  # the one place a failed forward is logged
            if len(items) == 1:
                log.exception("a %s item failed", kind.value)
                return [Failed(items[0].id, as_api_error(e))]
            log.warning("a batch of %d %s items failed (%s); running each alone", len(items), kind.value,
                        type(e).__name__)
            return [out for w in items for out in self._score(kind, [w])]
        return [Failed(w.id, r) if isinstance(r, Exception) else Finished(w.id, r) for w, r in zip(items, results)]

    def _admit(self, works: list[GenWork]) -> list[Output]:
        """Prefill new sequences in one forward and join them to the running batch; if that fails
        (nothing joined), each alone. Once they joined, a failure of the batch's own bookkeeping
        fails every running sequence, as after a failed step."""
        seqs = [GenSequence(list(w.prompt_ids), w.params) for w in works]
        try:
            self._decoder().admit(seqs)
        except Exception as e:
            if len(works) == 1:
                log.exception("a generate item failed")
                return [Failed(works[0].id, as_api_error(e))]
            log.warning("a batch of %d generate items failed (%s); running each alone", len(works), type(e).__name__)
            return [out for w in works for out in self._admit([w])]
        for w, s in zip(works, seqs):
            self.sequences[id(s)] = _Sequence(w, s)
        try:
            outputs = self._emit(seqs)
        except Exception as e:  # admitted, but their first tokens could not be sent: they alone fail
            log.exception("sending the first tokens of %d new sequences failed", len(seqs))
            outputs = []
            for s in seqs:
                s.finish_reason, s.failure = "error", e
        try:
            return outputs + self._retire()
        except Exception as e:
            log.exception("dropping finished sequences after %d joined failed", len(seqs))
            return outputs + self.fail(as_api_error(e))

    def _decode(self) -> list[Output]:
        """One decode step for every running sequence (after dropping aborted ones). A failed step
        leaves the batch as it was and is rerun one sequence at a time: a sequence whose own step
        fails ends alone."""
        outputs = self._retire()
        if not self.decoder.seqs:
            return outputs
        try:
            seconds = self.decoder.step().seconds
        except Exception as e:  # rerun per sequence: only a sequence whose own step fails ends
            log.warning("a decode step of %d sequences failed (%s); stepping each alone", len(self.decoder.seqs),
                        type(e).__name__)
            seconds = self.decoder.step_each().seconds
        self.metrics.observe_decode(len(self.decoder.seqs), self.kv_rows, seconds)
        return outputs + self._emit(self.decoder.seqs) + self._retire()

    def _decoder(self) -> Decoder:
        """The decoder; after a failure a fresh one, made once the old one's buffers are gone."""
        if self.decoder is None:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.decoder = self.runner.decoder()
        return self.decoder

    def _emit(self, seqs: list[GenSequence]) -> list[Output]:
        """Each sequence's new token: its metrics, and for a stream its :class:`TokenDelta`."""
        now = time.monotonic()
        first, gaps, tokens, outputs = [], [], [], []
        for seq in seqs:
            s = self.sequences[id(seq)]
            if seq.finish_reason in ("cancelled", "error") or not seq.tokens:
                continue
            token = seq.tokens[-1]
            if s.last_token_at is None:
                first.append(now - s.work.arrived)
            else:
                gaps.append(now - s.last_token_at)
            s.last_token_at = now
            tokens.append((s.work.endpoint, token))
            if not s.work.streamed:
                continue
            text = seq.safe_text()
            delta, s.sent = text[s.sent:], max(s.sent, len(text))
            outputs.append(TokenDelta(s.work.id, token, delta, seq.finish_reason,
                                      seq.summary() if seq.finished else None))
        self.metrics.observe_tokens(first, gaps, tokens)
        return outputs

    def _retire(self) -> list[Output]:
        """Drop finished sequences from the batch (freeing their KV rows); their results."""
        outputs = []
        for seq in self.decoder.filter():
            s = self.sequences.pop(id(seq))
            if not s.aborted:
                outputs.append(_result(s))
        self.metrics.set_work(kv_rows=self.kv_rows)
        return outputs


def _result(s: _Sequence) -> Output:
    seq = s.seq
    if seq.failure is not None:  # its own decode step raised: it alone fails
        log.error("a sequence's decode step failed alone", exc_info=seq.failure)
        return Failed(s.work.id, as_api_error(seq.failure))
    if seq.finish_reason == "error":  # its own distribution went non-finite: it alone fails
        return Failed(s.work.id, BadRequest(f"generation failed for this request: {seq.error}",
                                            code="non_finite_distribution"))
    if s.work.streamed:  # every token went as a TokenDelta; the future only ends
        return Finished(s.work.id, None)
    return Finished(s.work.id, Generated(seq.tokens, seq.text, seq.finish_reason, seq.summary(),
                                         seq.params.num_samples))


class EngineLoop:
    """Runs an :class:`EngineCore` on a thread of its own. :meth:`put` takes inputs from any
    thread; after each half of a turn that produced outputs or changed the queue, ``publish``
    gets an :class:`EngineOutputs` (the outputs and the engine's stats), on this thread."""

    def __init__(self, core: EngineCore, publish: Callable[[EngineOutputs], None]):
        self.core, self.publish = core, publish
        self.seen = 0  # the last AddRequest taken
        self.paused = False
        self._inbox: list[EngineInput] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._published = (0, 0)  # the queue depth and last submit the API side was last told of
        self._thread = threading.Thread(target=self._run, name="tfb-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, message: EngineInput) -> None:
        with self._wake:
            self._inbox.append(message)
            self._wake.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped:
            messages = self._next()
            for m in messages:
                self._handle(m)
            if self.paused or self._stopped:
                self._publish([])
                continue
            # a scoring batch's answers and new sequences' first tokens go out before the decode step
            self._publish(self._guarded(self.core.run_planned))
            self._publish(self._guarded(self.core.decode))

    def _publish(self, outputs: list[Output]) -> None:
        """Outputs, or the stats when the queue changed (the API side's depth)."""
        stats = self.stats()
        if outputs or (stats.depth, stats.seen) != self._published:
            self._published = (stats.depth, stats.seen)
            self.publish(EngineOutputs(outputs, stats))

    def _guarded(self, part: Callable[[], list[Output]]) -> list[Output]:
        try:
            return part()
        except Exception as e:  # a fault of the engine's own: everything it holds fails, it goes on
            log.exception("an engine step failed")
            error = as_api_error(e)
            waiting, self.core.waiting = list(self.core.waiting), deque()
            return [Failed(w.id, error) for w in waiting] + self.core.fail(error)

    def stats(self) -> EngineStats:
        return EngineStats(self.core.depth, self.seen, self.core.kv_rows)

    def _next(self) -> list[EngineInput]:
        """The inputs put since the last turn, once there is something to do."""
        with self._wake:
            while not self._inbox:
                at = None if self.paused else self.core.next_turn_at()
                if at is not None and (at == 0.0 or time.monotonic() >= at):
                    break
                self._wake.wait(None if at is None else at - time.monotonic())
            messages, self._inbox = self._inbox, []
        return messages

    def _handle(self, message: EngineInput) -> None:
        match message:
            case AddRequest(number=number, works=works):
                self.core.add(works)
                self.seen = number
            case Abort(ids=ids):
                self.core.abort(ids)
            case Pause():
                self.paused = True
            case Resume():
                self.paused = False
            case Stop():
                self._stopped = True
            case _:
                raise TypeError(f"no engine input {type(message).__name__}")
