"""The worker side: the state that runs on the scheduler's worker thread, apart from request serving.

:class:`ModelRunner` owns the posterior and the engines :func:`tfb_core.resolve_engine` picks
(``--engine``): ``step(batch)`` scores a batch of :class:`ChoiceWork` in ONE forward over
items x choices x K rows (``choice_probs``, through the static prefill engine on CUDA) and
reduces each item's (K, C) probabilities to the model average and its entropy split; a batch
of :class:`GenWork` is admitted to the :class:`GenerationEngine`.

:class:`GenerationEngine` owns the running :class:`tfb_core.Decoder` (whatever the engine:
the server holds that one type). New sequences are prefilled and join it between decode
steps (continuous batching); every step advances all active sequences at once; a finished,
timed-out or cancelled sequence leaves at the next step boundary and its KV rows are freed.
Each new token is sent to its request as a :class:`GenEvent` on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from tfb_core import Decoder, Engine, GenSequence, TokenInfo, encoding

from .errors import BadRequest, as_api_error
from .loader import Loaded, load, resolve_settings
from .metrics import Metrics, Timer
from .scheduler import PENDING, Batch

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ChoiceWork:
    """One multiple-choice item, tokenized, waiting for its forward."""

    encoded: encoding.Encoded
    seed: int
    num_samples: int
    deadline: float
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    kind: str = "choice"

    @property
    def rows(self) -> int:
        return len(self.encoded.sequences) * self.num_samples

    @property
    def length(self) -> int:
        return max(len(s) for s in self.encoded.sequences)


@dataclass(eq=False)
class ScoreWork:
    """One prompt to score token by token (``/v1/completions`` with ``echo``), waiting for its forward."""

    prompt_ids: list[int]
    seed: int
    num_samples: int
    top_logprobs: int
    deadline: float
    future: asyncio.Future  # resolved with the prompt's list[TokenInfo] (every token but the first)
    arrived: float = field(default_factory=time.monotonic)
    kind: str = "score"

    @property
    def rows(self) -> int:
        return self.num_samples

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


@dataclass
class ChoiceOutput:
    """An item's per-sample probabilities and their reduction."""

    samples: torch.Tensor  # (K, C), untempered
    probs: torch.Tensor  # (C,) the tempered model average
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float


class ModelRunner:
    """Owns the posterior; ``step`` runs on the scheduler's worker thread only."""

    def __init__(self, loaded: Loaded, metrics: Metrics, engine: str = "auto"):
        self.post = loaded.post
        self.metrics = metrics
        try:
            self.model = Engine(self.post, engine)  # its forwards: static kernels on CUDA, else eager
        except ValueError as e:
            raise ValueError(f"--engine {engine}: {e}; use auto or eager") from None
        self.kind = self.model.kind  # "static" or "eager"
        # the continuous decode loop's state; on CUDA new prompts run through the scoring engine's graphs
        self.engine = GenerationEngine(self.post, metrics, self.model)

    def step(self, batch: Batch) -> list:
        if batch.kind == "generate":
            return self.engine.admit(batch.items)
        if batch.kind == "score":
            return self.score_step(batch.items)
        if batch.kind != "choice":
            raise ValueError(f"no step for work of kind {batch.kind!r}")
        return self.choices_step(batch.items)

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


def load_engine(settings, metrics: Metrics, load=load, set_status=lambda status: None
                ) -> tuple[Loaded, object, ModelRunner]:
    """Load the posterior ``settings`` describe, fill in what it decides (K) and make its
    runner: (loaded, the settings, the runner)."""
    loaded = load(settings, set_status)
    settings = resolve_settings(settings, loaded.post)
    return loaded, settings, ModelRunner(loaded, metrics, settings.engine)


@dataclass
class GenEvent:
    """What one step produced for one sequence."""

    token: TokenInfo | None
    text: str  # new text that may be shown (held back near a possible stop string)
    finish_reason: str | None = None
    summary: dict | None = None


@dataclass(eq=False)
class GenWork:
    """One sequence to generate (a request's choice). A streamed request's works share one
    ``events`` queue of (``index``, :class:`GenEvent`); without one (not streamed) no event is made."""

    seq: GenSequence
    endpoint: str
    deadline: float
    future: asyncio.Future  # resolved with the GenSequence when it finishes
    events: asyncio.Queue | None
    loop: asyncio.AbstractEventLoop
    index: int = 0  # the choice's index in its request
    arrived: float = field(default_factory=time.monotonic)
    kind: str = "generate"
    sent: int = 0  # characters of text already sent (worker side)
    last_token_at: float | None = None

    def __post_init__(self):
        self.future.add_done_callback(self._failed)

    def _failed(self, future: asyncio.Future) -> None:
        """A failed prefill or decode step, or a drop by the scheduler, ends the event stream too."""
        if self.events is not None and not future.cancelled() and future.exception() is not None:
            self.events.put_nowait((self.index, GenEvent(None, "", "error")))

    @property
    def rows(self) -> int:
        return self.seq.params.num_samples

    @property
    def length(self) -> int:
        return len(self.seq.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self.future.done()


class GenerationEngine:
    """The running decode batch; every method runs on the scheduler's worker thread."""

    def __init__(self, post, metrics: Metrics, engine: Engine):
        self.post = post
        self.metrics = metrics
        self.engine = engine  # makes the decoder: static (static KV cache, CUDA graphs) or eager
        self.decoder: Decoder | None = None  # made at the first admit, then kept (buffers, graphs)
        self.works: dict[int, GenWork] = {}  # id(seq) -> work

    @property
    def active(self) -> int:
        return len(self.decoder.seqs) if self.decoder is not None else 0

    @property
    def kv_rows(self) -> int:
        return self.decoder.kv_rows if self.decoder is not None else 0

    def admit(self, works: list[GenWork]) -> list:
        """Prefill new sequences in one forward and join them to the running batch. One result
        per work, a cancelled one (skipped) included: the scheduler pairs them with its items.

        Raises only while nothing joined (the scheduler then reruns each work alone); once the
        sequences joined, a failure of the batch's own bookkeeping fails every running request,
        as after a failed step, rather than letting a rerun join them twice."""
        results = [PENDING] * len(works)
        works = [w for w in works if not w.cancelled]
        if not works:
            return results
        for w in works:
            self.works[id(w.seq)] = w
        seqs = [w.seq for w in works]
        try:
            self._decoder().admit(seqs)
        except Exception:  # all or nothing: the scheduler reruns each request alone
            for w in works:
                self.works.pop(id(w.seq), None)
            raise
        try:
            self._emit(seqs)
        except Exception as e:  # admitted, but their first tokens could not be sent: they alone fail
            log.exception("sending the first tokens of %d new sequences failed", len(seqs))
            for s in seqs:
                s.finish_reason, s.failure = "error", e
        try:
            self._retire()
        except Exception as e:
            log.exception("dropping finished sequences after %d joined failed", len(seqs))
            self.fail(as_api_error(e))
        return results

    def step(self) -> None:
        """One decode step for every active sequence (after dropping cancelled ones). A failed
        step leaves the batch as it was and is rerun one sequence at a time: a sequence whose
        own step fails ends alone, its request answered with that error (sanitized)."""
        if self.decoder is None:
            return
        for s in self.decoder.seqs:
            if self.works[id(s)].cancelled and not s.finished:
                s.finish_reason = "cancelled"
        self._retire()
        if not self.decoder.seqs:
            return
        try:
            seconds = self.decoder.step().seconds
        except Exception as e:  # rerun per sequence: only a sequence whose own step fails ends
            log.warning("a decode step of %d sequences failed (%s); stepping each alone", len(self.decoder.seqs),
                        type(e).__name__)
            seconds = self.decoder.step_each().seconds
        self.metrics.observe_decode(len(self.decoder.seqs), self.kv_rows, seconds)
        self._emit(self.decoder.seqs)
        self._retire()

    def fail(self, error: Exception) -> None:
        """A decode step failed beyond what :meth:`step` reruns sequence by sequence (the engine's
        own bookkeeping raised): every active sequence gets the error; the KV rows are freed."""
        works, self.works = list(self.works.values()), {}
        self.decoder = None  # its state may be half-stepped: the next admit starts a fresh one
        self.metrics.set_work(kv_rows=0)
        for w in works:  # last: a client told of the failure finds the engine already reset
            w.loop.call_soon_threadsafe(_fail, w, error)

    def _decoder(self) -> Decoder:
        """The decoder; after a failure a fresh one, made once the old one's buffers are gone
        (the failed step's traceback held them until the scheduler let go of it)."""
        if self.decoder is None:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.decoder = self.engine.decoder()
        return self.decoder

    def _emit(self, seqs: list[GenSequence]) -> None:
        """Each sequence's new token: its metrics, and for a stream its event. The events of a
        step reach the event loop in one call (not one wake-up per token)."""
        now = time.monotonic()
        first, gaps, tokens, events = [], [], [], {}
        for s in seqs:
            w = self.works[id(s)]
            if s.finish_reason in ("cancelled", "error") or not s.tokens:
                continue
            token = s.tokens[-1]
            if w.last_token_at is None:
                first.append(now - w.arrived)
            else:
                gaps.append(now - w.last_token_at)
            w.last_token_at = now
            tokens.append((w.endpoint, token))
            if w.events is None:
                continue
            text = s.safe_text()
            delta, w.sent = text[w.sent:], max(w.sent, len(text))
            event = GenEvent(token, delta, s.finish_reason, s.summary() if s.finished else None)
            events.setdefault(w.loop, []).append((w, event))
        self.metrics.observe_tokens(first, gaps, tokens)
        for loop, batch in events.items():
            loop.call_soon_threadsafe(_put, batch)

    def _retire(self) -> None:
        """Drop finished sequences from the batch (freeing their KV rows), resolve their work."""
        if self.decoder is None:
            return
        for s in self.decoder.filter():
            w = self.works.pop(id(s))
            w.loop.call_soon_threadsafe(_finish, w)
        self.metrics.set_work(kv_rows=self.kv_rows)


def _put(batch: list[tuple[GenWork, GenEvent]]) -> None:
    for w, event in batch:
        w.events.put_nowait((w.index, event))


def _fail(w: GenWork, error: Exception) -> None:
    if not w.future.done():
        w.future.set_exception(error)


def _finish(w: GenWork) -> None:
    if w.future.done():
        return
    if w.seq.failure is not None:  # its own decode step raised: it alone fails
        log.error("a sequence's decode step failed alone", exc_info=w.seq.failure)
        w.future.set_exception(as_api_error(w.seq.failure))
    elif w.seq.finish_reason == "error":  # its own distribution went non-finite: it alone fails
        w.future.set_exception(BadRequest(f"generation failed for this request: {w.seq.error}",
                                          code="non_finite_distribution"))
    else:
        w.future.set_result(w.seq)
