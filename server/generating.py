"""Text generation: OpenAI completions and chat, decoded from the model average of K samples.

Worker side (:class:`GenerationEngine`): owns the running batch (a :class:`StaticDecoder` with
CUDA graphs on CUDA for the Llama family, else an eager :class:`DecodeBatch`). New sequences
are prefilled and join it between decode steps (continuous batching); every step advances all
active sequences at once; a finished, timed-out or cancelled sequence leaves at the next step
boundary and its KV rows are freed. Each new token is sent to its request as a
:class:`GenEvent` on the event loop.

Event-loop side (:class:`CompletionsServing`): validate, tokenize, queue one :class:`GenWork`
per choice (``n`` per prompt), then either collect the events into one response or stream
them as server-sent events in OpenAI's chunk format.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from tfb_core.errors import TFBError
from tfb_core.cuda_decode import StaticDecoder
from tfb_core.generation import DecodeBatch, GenSequence, SamplingParams, TokenInfo, safe_text
from tfb_core.scoring import apply_chat, max_context

from .errors import BadRequest, NotFound, RequestTimeout, as_api_error, public_error
from .limits import Tokenizing, check_chars, max_prompt_chars
from .metrics import Metrics
from .openai_protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                              ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessageOut,
                              ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest,
                              CompletionResponse, CompletionUsage, GenerationUncertainty,
                              SequenceUncertainty, TokenUncertainty, TopLogprob)
from .scheduler import PENDING, Scheduler
from .settings import Settings

log = logging.getLogger(__name__)

COMPLETIONS_ENDPOINT = "/v1/completions"
CHAT_ENDPOINT = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 16


@dataclass
class GenEvent:
    """What one step produced for one sequence."""

    token: TokenInfo | None
    text: str  # new text that may be shown (held back near a possible stop string)
    finish_reason: str | None = None
    summary: dict | None = None


@dataclass(eq=False)
class GenWork:
    """One sequence to generate (a request's choice), with the queue its tokens arrive on."""

    seq: GenSequence
    endpoint: str
    deadline: float
    future: asyncio.Future  # resolved with the GenSequence when it finishes
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)
    kind: str = "generate"
    sent: int = 0  # characters of text already sent (worker side)
    last_token_at: float | None = None

    def __post_init__(self):
        self.future.add_done_callback(self._failed)

    def _failed(self, future: asyncio.Future) -> None:
        """A failed prefill or decode step, or a drop by the scheduler, ends the event stream too."""
        if not future.cancelled() and future.exception() is not None:
            self.events.put_nowait(GenEvent(None, "", "error"))

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

    def __init__(self, post, metrics: Metrics, static: bool):
        self.post = post
        self.metrics = metrics
        # static: the static-cache decoder with CUDA graphs (made at the first admit, then kept
        # with its buffers and graphs); else HF's eager DecodeBatch
        self.static = static
        self.decoder: StaticDecoder | None = None
        self.batch: DecodeBatch | StaticDecoder | None = None
        self.works: dict[int, GenWork] = {}  # id(seq) -> work

    @property
    def active(self) -> int:
        return len(self.batch.seqs) if self.batch is not None else 0

    @property
    def kv_rows(self) -> int:
        return self.batch.kv_rows if self.batch is not None else 0

    def admit(self, works: list[GenWork]) -> list:
        """Prefill new sequences in one forward and join them to the running batch."""
        works = [w for w in works if not w.cancelled]
        if works:
            for w in works:
                self.works[id(w.seq)] = w
            try:
                new = DecodeBatch.prefill(self.post, [w.seq for w in works])
                self._emit(new.seqs)
                if self.static:
                    self.batch = self._decoder().join(new)
                else:
                    self.batch = new if self.batch is None else DecodeBatch.concatenate([self.batch, new])
            except Exception:
                for w in works:
                    self.works.pop(id(w.seq), None)
                raise
            self._retire()
        return [PENDING] * len(works)

    def step(self) -> None:
        """One decode step for every active sequence (after dropping cancelled ones). A failed
        step leaves the batch as it was and is rerun one sequence at a time: a sequence whose
        own step fails ends alone, its request answered with that error (sanitized)."""
        for s in self.batch.seqs:
            if self.works[id(s)].cancelled and not s.finished:
                s.finish_reason = "cancelled"
        self._retire()
        if self.batch is None:
            return
        try:
            seconds = self.batch.step()
        except Exception as e:  # rerun per sequence: only a sequence whose own step fails ends
            log.warning("a decode step of %d sequences failed (%s); stepping each alone", len(self.batch.seqs),
                        type(e).__name__)
            seconds = self.batch.step_each()
        self.metrics.observe_decode(len(self.batch.seqs), self.kv_rows, seconds)
        self._emit(self.batch.seqs)
        self._retire()

    def fail(self, error: Exception) -> None:
        """A decode step failed beyond what :meth:`step` reruns sequence by sequence (the engine's
        own bookkeeping raised): every active sequence gets the error; the KV rows are freed."""
        works, self.works = list(self.works.values()), {}
        self.batch = None
        self.decoder = None  # its state may be half-stepped: the next admit starts a fresh one
        self.metrics.kv_rows.labels(self.metrics.model).set(0)
        for w in works:  # last: a client told of the failure finds the engine already reset
            w.loop.call_soon_threadsafe(_fail, w, error)

    def _decoder(self) -> StaticDecoder:
        """The static decoder; after a failure a fresh one, made once the old one's buffers are
        gone (the failed step's traceback held them until the scheduler let go of it)."""
        if self.decoder is None:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.decoder = StaticDecoder(self.post)
        return self.decoder

    def _emit(self, seqs: list[GenSequence]) -> None:
        now = time.monotonic()
        for s in seqs:
            w = self.works[id(s)]
            if s.finish_reason in ("cancelled", "error") or not s.tokens:
                continue
            token = s.tokens[-1]
            if w.last_token_at is None:
                self.metrics.time_to_first_token.labels(self.metrics.model).observe(now - w.arrived)
            else:
                self.metrics.inter_token_latency.labels(self.metrics.model).observe(now - w.last_token_at)
            w.last_token_at = now
            self.metrics.generation_tokens.labels(self.metrics.model).inc()
            self.metrics.observe_uncertainty(w.endpoint, token.predictive_entropy, token.expected_entropy,
                                             token.mutual_information)
            text = safe_text(s)
            delta, w.sent = text[w.sent:], max(w.sent, len(text))
            event = GenEvent(token, delta, s.finish_reason, s.summary() if s.finished else None)
            w.loop.call_soon_threadsafe(_put, w, event)

    def _retire(self) -> None:
        """Drop finished sequences from the batch (freeing their KV rows), resolve their work."""
        if self.batch is None:
            return
        for s in self.batch.filter():
            w = self.works.pop(id(s))
            w.loop.call_soon_threadsafe(_finish, w)
        if not self.batch.seqs:
            self.batch = None
        self.metrics.kv_rows.labels(self.metrics.model).set(self.kv_rows)


def _put(w: GenWork, event: GenEvent) -> None:
    w.events.put_nowait(event)


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


@dataclass(eq=False)
class EventStream:
    """A streamed response's server-sent events and its work: :meth:`close` drops the work,
    for a response that ends before its events are read (the client left before the first)."""

    events: AsyncIterator[str]
    works: list[GenWork]

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    def close(self) -> None:
        for w in self.works:
            w.future.cancel()


class CompletionsServing:
    """``POST /v1/completions`` and ``POST /v1/chat/completions``."""

    def __init__(self, post, model_id: str, scheduler: Scheduler, settings: Settings, metrics: Metrics,
                 tokenizer=None, tokenizing: Tokenizing | None = None):
        self.post = post
        self.tokenizer = tokenizer or post.tokenizer  # the event loop's (see server.app.ready)
        self.tokenizing = tokenizing or Tokenizing()  # the one thread that uses it
        self.model_id = model_id
        self.scheduler = scheduler
        self.settings = settings
        self.metrics = metrics
        self.context = max_context(post.model) or 2048
        self.max_chars = max_prompt_chars(self.tokenizer, self.context)

    # --- requests -> work ------------------------------------------------------------------

    def check(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        """Counts and sizes, before any tokenizing: model, K, sequences, KV rows, characters."""
        if request.model != self.model_id:
            raise NotFound(f"model {request.model!r} does not exist; this server serves {self.model_id!r} "
                           f"(GET /v1/models)", param="model", code="model_not_found")
        K = request.num_samples or self.settings.samples
        if K > self.settings.max_samples:
            raise BadRequest(f"'num_samples' is {K}; allowed: 1 to {self.settings.max_samples}",
                             param="num_samples", code="invalid_value")
        chat = isinstance(request, ChatCompletionRequest)
        texts = [m.text for m in request.messages] if chat else \
            [request.prompt] if isinstance(request.prompt, str) else request.prompt
        prompts = 1 if chat else len(texts)
        if prompts * request.n > self.settings.max_items:
            raise BadRequest(f"{prompts} prompt(s) x n={request.n} is {prompts * request.n} sequences; "
                             f"at most {self.settings.max_items} are allowed in one request",
                             param="n" if chat else "prompt")
        rows = prompts * request.n * K
        if rows > self.settings.max_kv_rows:
            raise BadRequest(f"this request needs {rows} KV cache rows ({prompts} prompt(s) x n={request.n} x "
                             f"num_samples={K}); at most {self.settings.max_kv_rows} are allowed (the "
                             f"server's --max-kv-rows): ask for fewer prompts, n or num_samples",
                             param="num_samples", code="too_many_kv_rows")
        chars = sum(len(t) for t in texts) if chat else max(len(t) for t in texts)
        check_chars(chars, self.max_chars, "messages" if chat else "prompt", self.context)

    def prepare(self, request: CompletionRequest | ChatCompletionRequest, loop: asyncio.AbstractEventLoop
                ) -> tuple[list[GenWork], list[list[int]]]:
        """Tokenize and make one work per sequence (on the tokenizing thread, after :meth:`check`)."""
        K = request.num_samples or self.settings.samples
        if isinstance(request, ChatCompletionRequest):
            try:
                text = apply_chat(self.tokenizer, [{"role": "system" if m.role == "developer" else m.role,
                                                    "content": m.text} for m in request.messages])
            except TFBError as e:
                raise BadRequest(f"'messages': {e}", param="messages") from None
            prompts = [self.tokenizer(text, add_special_tokens=False).input_ids]
            max_tokens = request.max_completion_tokens or request.max_tokens
            top = request.top_logprobs or 0
            endpoint = CHAT_ENDPOINT
        else:
            texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            prompts = [self.tokenizer(t).input_ids for t in texts]
            max_tokens = request.max_tokens
            top = request.logprobs or 0
            endpoint = COMPLETIONS_ENDPOINT
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise BadRequest(f"the prompt is {longest} tokens long; the model's context is {self.context} "
                             f"tokens", param="messages" if endpoint == CHAT_ENDPOINT else "prompt")
        max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, self.context - longest)
        if longest + max_tokens > self.context:
            raise BadRequest(f"'max_tokens' is {max_tokens}, but the prompt ({longest} tokens) plus "
                             f"max_tokens must fit the model's context of {self.context} tokens: allowed "
                             f"1 to {self.context - longest}", param="max_tokens", code="invalid_value")
        deadline = time.monotonic() + self.settings.request_timeout
        works = []
        for p in prompts:
            for i in range(request.n):
                params = SamplingParams(
                    max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                    top_k=request.top_k, stop=request.stop_list,
                    seed=None if request.seed is None else request.seed + i, num_samples=K,
                    weight_seed=self.post.config.seed, top_logprobs=top)
                seq = GenSequence(list(p), params)
                works.append(GenWork(seq, endpoint, deadline, loop.create_future(), asyncio.Queue(), loop))
        return works, prompts

    # --- responses -------------------------------------------------------------------------

    async def create(self, request: CompletionRequest | ChatCompletionRequest,
                     report: Callable[[str], None] = lambda status: None):
        """The response, or with ``stream`` its server-sent events; ``report(status)`` tells the
        metrics how a stream ended ("200", an error's status, or "client_closed")."""
        self.check(request)
        works, prompts = await self.tokenizing.run(self.prepare, request, asyncio.get_running_loop())
        self.scheduler.submit(works)  # all or none: a 429 or 503 counts no prompt tokens
        self.metrics.prompt_tokens.labels(self.metrics.model).inc(sum(len(p) for p in prompts) * request.n)
        if request.stream:
            report("client_closed")  # until the stream ends otherwise: its body may never start
            return EventStream(self.stream(request, works, prompts, report), works)
        try:
            seqs = await self.scheduler.wait(works, self.settings.request_timeout)
        finally:  # answered, failed, or the client went away: free the slots at the next step
            for w in works:
                w.future.cancel()
        return self.response(request, seqs, prompts)

    def _usage(self, prompts, seqs, n) -> CompletionUsage:
        p = sum(len(x) for x in prompts) * n
        c = sum(len(s.tokens) for s in seqs)
        return CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def _uncertainty(self, seq: GenSequence, tokens: list[TokenInfo], summary: dict | None
                     ) -> GenerationUncertainty:
        return GenerationUncertainty(
            tokens=[TokenUncertainty(token=self._piece(t.token_id), logprob=t.logprob,
                                     predictive_entropy=t.predictive_entropy,
                                     expected_entropy=t.expected_entropy,
                                     mutual_information=t.mutual_information) for t in tokens],
            sequence=SequenceUncertainty(**summary) if summary is not None else None,
            num_samples=seq.params.num_samples, sigma=self.post.sigma)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, tokens: list[TokenInfo], top: int, offset: int = 0) -> CompletionLogprobs:
        pieces = [self._piece(t.token_id) for t in tokens]
        offsets, at = [], offset
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        return CompletionLogprobs(
            tokens=pieces, token_logprobs=[t.logprob for t in tokens],
            top_logprobs=[{self._piece(i): lp for i, lp in t.top} for t in tokens] if top else None,
            text_offset=offsets)

    def _chat_logprobs(self, tokens: list[TokenInfo]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            piece = self._piece(token_id)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        return ChatLogprobs(content=[ChatTokenLogprob(**entry(t.token_id, t.logprob),
                                                      top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in t.top])
                                     for t in tokens])

    def response(self, request, seqs: list[GenSequence], prompts):
        created, usage = int(time.time()), self._usage(prompts, seqs, request.n)
        if isinstance(request, ChatCompletionRequest):
            choices = [ChatChoice(index=i, message=ChatMessageOut(content=s.text), finish_reason=s.finish_reason,
                                  logprobs=self._chat_logprobs(s.tokens) if request.logprobs else None,
                                  uncertainty=self._uncertainty(s, s.tokens, s.summary()))
                       for i, s in enumerate(seqs)]
            return ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=created,
                                          model=self.model_id, choices=choices, usage=usage)
        choices = [CompletionChoice(index=i, text=s.text, finish_reason=s.finish_reason,
                                    logprobs=self._completion_logprobs(s.tokens, request.logprobs)
                                    if request.logprobs is not None else None,
                                    uncertainty=self._uncertainty(s, s.tokens, s.summary()))
                   for i, s in enumerate(seqs)]
        return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=created, model=self.model_id,
                                  choices=choices, usage=usage)

    def _chunk(self, request, rid: str, created: int, index: int, w: GenWork, text: str,
               tokens: list[TokenInfo], reason: str | None, summary: dict | None, offset: int = 0):
        """One choice's chunk; ``offset``: where its tokens start in the choice's text."""
        unc = self._uncertainty(w.seq, tokens, summary)
        if isinstance(request, ChatCompletionRequest):
            return ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=[
                ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=reason,
                                logprobs=self._chat_logprobs(tokens) if request.logprobs and tokens else None,
                                uncertainty=unc)])
        return CompletionResponse(id=rid, created=created, model=self.model_id, choices=[
            CompletionChoice(index=index, text=text, finish_reason=reason, uncertainty=unc,
                             logprobs=self._completion_logprobs(tokens, request.logprobs, offset)
                             if request.logprobs is not None and tokens else None)])

    def _usage_chunk(self, request, rid: str, created: int, works: list[GenWork], prompts):
        """OpenAI's last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
        usage = self._usage(prompts, [w.seq for w in works], request.n)
        chunk = ChatCompletionChunk if isinstance(request, ChatCompletionRequest) else CompletionResponse
        return chunk(id=rid, created=created, model=self.model_id, choices=[], usage=usage)

    async def stream(self, request, works: list[GenWork], prompts,
                     report: Callable[[str], None] = lambda status: None) -> AsyncIterator[str]:
        """Server-sent events: a chunk per token per choice, per choice a last chunk with its
        finish reason and summary, a usage chunk if ``stream_options.include_usage``, then
        ``data: [DONE]``. A failed or dropped work ends the stream with an error event at once;
        a client that goes away cancels its sequences."""
        chat = isinstance(request, ChatCompletionRequest)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, w: GenWork) -> None:
            while True:
                event = await w.events.get()
                await merged.put((i, event))
                if event.finish_reason is not None:
                    return

        pumps = [asyncio.create_task(pump(i, w)) for i, w in enumerate(works)]
        report("client_closed")  # until it ends otherwise

        def failed(error: BaseException) -> str:
            status, body, _ = public_error(error)
            report(str(status))
            return _sse_error(body)

        try:
            if chat:
                for i in range(len(works)):
                    yield _sse(ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=[
                        ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]))
            left = len(works)
            deadline = works[0].deadline
            offsets = [0] * len(works)  # per choice: characters of its tokens sent (text_offset)
            while left:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    yield failed(RequestTimeout("the request took longer than the server's timeout; "
                                                "its work was dropped", code="timeout"))
                    return
                try:
                    i, event = await asyncio.wait_for(merged.get(), timeout)
                except asyncio.TimeoutError:
                    continue
                w = works[i]
                if event.finish_reason == "error":
                    yield failed(w.future.exception())
                    return
                finished = event.finish_reason is not None
                left -= finished
                if event.token is not None or event.text:
                    tokens = [event.token] if event.token is not None else []
                    yield _sse(self._chunk(request, rid, created, i, w, event.text, tokens, None, None,
                                           offsets[i]))
                    offsets[i] += sum(len(self._piece(t.token_id)) for t in tokens)
                if finished:  # the choice's last chunk: reason and summary
                    reason = event.finish_reason if event.finish_reason in ("stop", "length") else None
                    yield _sse(self._chunk(request, rid, created, i, w, "", [], reason, event.summary))
            if request.stream_options is not None and request.stream_options.include_usage:
                yield _sse(self._usage_chunk(request, rid, created, works, prompts))
            report("200")
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away: free the slots at the next step
            for t in pumps:
                t.cancel()
            for w in works:
                w.future.cancel()


def _sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


def _sse_error(body: dict) -> str:
    """The OpenAI error event: the body the HTTP error would have (server.errors.public_error)."""
    return f"data: {json.dumps(body)}\n\n"
