"""Serving text generation: OpenAI completions and chat, decoded from the model average of K samples.

API side only (the engine, server/engine/core.py, decodes): validate, tokenize, submit one
:class:`~server.engine.protocol.GenWork` per choice (``n`` per prompt) to the engine's client,
then either collect the results (:class:`~server.engine.protocol.Generated`) into one response or
stream the :class:`~server.engine.protocol.TokenDelta` as server-sent events in OpenAI's chunk
format. :class:`CompletionServing` and
:class:`ChatServing` each say what differs (how a request becomes prompts, how a choice and a
chunk look) over the shared :class:`GenerationServing`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from tfb_core import SamplingParams, TFBError, TokenInfo, encoding

from .engine.client import EngineClient, check_room
from .engine.protocol import Failed, GenWork, Generated, ScoreWork
from .errors import BadRequest, NotFound, RequestTimeout, sse_error
from .limits import Tokenizing, check_chars, check_samples
from .loader import ServedModel
from .metrics import Metrics
from .openai_protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                              ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessageOut,
                              ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest,
                              CompletionResponse, CompletionUsage, FieldUncertainty, GenerationUncertainty,
                              SequenceUncertainty, TokenUncertainty, TopLogprob)
from .settings import Settings

COMPLETIONS_ENDPOINT = "/v1/completions"
CHAT_ENDPOINT = "/v1/chat/completions"
DEFAULT_MAX_TOKENS = 16


@dataclass(eq=False)
class EventStream:
    """A streamed response's server-sent events and its work's futures: :meth:`close` drops the
    work, for a response that ends before its events are read (the client left before the first)."""

    events: AsyncIterator[str]
    futures: list[asyncio.Future]

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    def close(self) -> None:
        for f in self.futures:
            f.cancel()




class GenerationServing:
    """What completions and chat share: checks, work, the response and the stream; a subclass
    says how a request becomes prompts and how its choices and chunks look."""

    endpoint: str
    id_prefix: str  # of response ids
    param: str  # the request field holding the text
    items_param: str  # the field to name when a request has too many sequences

    def __init__(self, model: ServedModel, engine: EngineClient, settings: Settings, metrics: Metrics,
                 tokenizing: Tokenizing | None = None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.tokenizing = tokenizing or Tokenizing()  # the one thread that uses it
        self.model_id = model.model_id
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.context = model.context_limit
        self.bound = model.token_bound
        self._pieces: dict[int, str] = {}  # token id -> its text (at most the vocabulary)

    # --- what a subclass says --------------------------------------------------------------

    def prompt_count(self, request) -> int:
        raise NotImplementedError

    def prompt_chars(self, request) -> int:
        """The characters of the longest prompt."""
        raise NotImplementedError

    def tokenize(self, request) -> list[list[int]]:
        raise NotImplementedError

    def choice(self, request, index: int, gen: Generated):
        raise NotImplementedError

    def response_of(self, rid: str, created: int, choices: list, usage: CompletionUsage):
        raise NotImplementedError

    def chunk(self, request, rid: str, created: int, index: int, text: str, tokens: list[TokenInfo],
              reason: str | None, uncertainty: GenerationUncertainty, offset: int):
        raise NotImplementedError

    def usage_chunk(self, rid: str, created: int, usage: CompletionUsage):
        raise NotImplementedError

    def opening_chunks(self, rid: str, created: int, n: int) -> list:
        """Chunks sent before any token (chat: each choice's role)."""
        return []

    def wants_offsets(self, request) -> bool:
        """Whether a stream's chunks carry text offsets (completions' logprobs)."""
        return False

    def grammar(self, request) -> str | None:
        """The grammar the output must match (None: free text)."""
        return None

    # --- requests -> work ------------------------------------------------------------------

    def check(self, request) -> None:
        """Counts and sizes, before any tokenizing: model, K, sequences, KV rows, characters."""
        if request.model != self.model_id:
            raise NotFound(f"model {request.model!r} does not exist; this server serves {self.model_id!r} "
                           f"(GET /v1/models)", param="model", code="model_not_found")
        K = request.num_samples or self.settings.samples
        check_samples(K, self.settings.max_samples)
        prompts = self.prompt_count(request)
        if prompts * request.n > self.settings.max_items:
            raise BadRequest(f"{prompts} prompt(s) x n={request.n} is {prompts * request.n} sequences; "
                             f"at most {self.settings.max_items} are allowed in one request",
                             param=self.items_param)
        per = self.model.kv_rows(K)  # K, or fewer with the noise in the last layers only
        rows = prompts * request.n * per
        if rows > self.settings.max_kv_rows:
            each = f"num_samples={K}" if per == K else f"{per} for num_samples={K}"
            raise BadRequest(f"this request needs {rows} KV cache rows ({prompts} prompt(s) x n={request.n} x "
                             f"{each}); at most {self.settings.max_kv_rows} are allowed (the "
                             f"server's --max-kv-rows): ask for fewer prompts, n or num_samples",
                             param="num_samples", code="too_many_kv_rows")
        check_chars(self.prompt_chars(request), self.bound, self.param, self.context)

    def prepare(self, request) -> tuple[list[GenWork], list[list[int]]]:
        """Tokenize and make one work per sequence (on the tokenizing thread, after :meth:`check`)."""
        K = request.num_samples or self.settings.samples
        prompts = self.tokenize(request)
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise BadRequest(f"the prompt is {longest} tokens long; the model's context is {self.context} "
                             f"tokens", param=self.param)
        max_tokens = request.max_new_tokens
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.context - longest)
        if longest + max_tokens > self.context:
            raise BadRequest(f"'max_tokens' is {max_tokens}, but the prompt ({longest} tokens) plus "
                             f"max_tokens must fit the model's context of {self.context} tokens: allowed "
                             f"1 to {self.context - longest}", param="max_tokens", code="invalid_value")
        if request.min_tokens > max_tokens:
            raise BadRequest(f"'min_tokens' is {request.min_tokens}, more than max_tokens ({max_tokens}); allowed: "
                             f"0 to {max_tokens}", param="min_tokens", code="invalid_value")
        grammar = self.grammar(request)
        deadline = time.monotonic() + self.settings.request_timeout
        works = []
        for p in prompts if max_tokens > 0 else []:  # 0: an echoed prompt is only scored
            for i in range(request.n):
                params = request.to_sampling_params(max_tokens, K, self.model.config.seed, choice=i, grammar=grammar)
                works.append(GenWork(list(p), params, self.endpoint, deadline, index=len(works),
                                     streamed=bool(request.stream), kv_rows=self.model.kv_rows(K)))
        return works, prompts

    # --- responses -------------------------------------------------------------------------

    async def create(self, request, report: Callable[[str], None] = lambda status: None):
        """The response, or with ``stream`` its server-sent events; ``report(status)`` tells the
        metrics how a stream ended ("200", an error's status, or "client_closed")."""
        self.check(request)
        check_room(True, self.engine.depth, self.prompt_count(request) * request.n, self.settings.max_queue)
        works, prompts = await self.tokenizing.run(self.prepare, request)
        events = asyncio.Queue() if request.stream else None  # one per request: (choice index, delta)
        futures = self.engine.submit(works, events)  # all or none: a 429 or 503 counts no prompt tokens
        self.metrics.prompt_tokens.labels(self.metrics.model).inc(sum(len(p) for p in prompts) * request.n)
        if request.stream:
            report("client_closed")  # until the stream ends otherwise: its body may never start
            return EventStream(self.stream(request, works, futures, events, prompts, report), futures)
        try:
            gens = await self.engine.wait(futures, self.settings.request_timeout)
        finally:  # answered, failed, or the client went away: free the slots at the next step
            for f in futures:
                f.cancel()
        return self.response(request, gens, prompts)

    def response(self, request, gens: list[Generated], prompts):
        created, usage = int(time.time()), self._usage(prompts, gens, request.n)
        choices = [self.choice(request, i, g) for i, g in enumerate(gens)]
        return self.response_of(f"{self.id_prefix}-{uuid.uuid4().hex}", created, choices, usage)

    async def stream(self, request, works: list[GenWork], futures: list[asyncio.Future], events: asyncio.Queue,
                     prompts, report: Callable[[str], None] = lambda status: None) -> AsyncIterator[str]:
        """Server-sent events: a chunk per token per choice, per choice a last chunk with its
        finish reason and summary, a usage chunk if ``stream_options.include_usage``, then
        ``data: [DONE]``. A failed or dropped work ends the stream with an error event at once;
        a client that goes away cancels its sequences."""
        rid = f"{self.id_prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        report("client_closed")  # until it ends otherwise

        def failed(error: BaseException) -> str:
            status, event = sse_error(error)
            report(str(status))
            return event

        options = request.stream_options
        continuous = options is not None and options.continuous_usage_stats
        prompt_tokens, generated = sum(len(x) for x in prompts) * request.n, 0

        def with_usage(c):
            """vLLM's continuous usage: the request's tokens so far on every chunk."""
            if continuous:
                c.usage = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                          total_tokens=prompt_tokens + generated)
            return c

        def chunk(i: int, text: str, tokens: list[TokenInfo], reason, summary, offset: int = 0) -> str:
            unc = self._uncertainty(works[i].params.num_samples, tokens, summary)
            return _sse(with_usage(self.chunk(request, rid, created, i, text, tokens, reason, unc, offset)))

        # the request's deadline arrives as an event too: one timer per stream, not one per token
        timer = asyncio.get_running_loop().call_later(max(0.0, works[0].deadline - time.monotonic()),
                                                      events.put_nowait, (-1, None))
        try:
            for c in self.opening_chunks(rid, created, len(works)):
                yield _sse(with_usage(c))
            left = len(works)
            offsets = [0] * len(works)  # per choice: characters of its tokens sent (text_offset)
            while left:
                batch = [] if not events.empty() else [await events.get()]
                while not events.empty():  # every event already made goes out in one write
                    batch.append(events.get_nowait())
                out = []
                for i, event in batch:
                    if event is None:
                        yield "".join(out) + failed(RequestTimeout(
                            "the request took longer than the server's timeout; its work was dropped",
                            code="timeout"))
                        return
                    if isinstance(event, Failed):
                        yield "".join(out) + failed(event.error)
                        return
                    finished = event.finish_reason is not None
                    left -= finished
                    generated += 1
                    out.append(chunk(i, event.text, [event.token], None, None, offsets[i]))
                    if self.wants_offsets(request):
                        offsets[i] += len(self._piece(event.token.token_id))
                    if finished:  # the choice's last chunk: reason and summary
                        reason = event.finish_reason if event.finish_reason in ("stop", "length") else None
                        out.append(chunk(i, "", [], reason, event.summary))
                yield "".join(out)
            if options is not None and options.include_usage:
                yield _sse(self.usage_chunk(rid, created, CompletionUsage(
                    prompt_tokens=prompt_tokens, completion_tokens=generated, total_tokens=prompt_tokens + generated)))
            report("200")
            yield "data: [DONE]\n\n"
        finally:  # finished, or the client went away: free the slots at the next step
            timer.cancel()
            for f in futures:
                f.cancel()

    # --- shared pieces ---------------------------------------------------------------------

    def _usage(self, prompts, gens: list[Generated], n) -> CompletionUsage:
        p = sum(len(x) for x in prompts) * n
        c = sum(len(g.tokens) for g in gens)
        return CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def _uncertainty(self, num_samples: int, tokens: list[TokenInfo], summary: dict | None,
                     first: int | None = None) -> GenerationUncertainty:
        """``first``: an echoed prompt's first token (listed first, with no numbers)."""
        head = [TokenUncertainty(token=self._piece(first), logprob=None, predictive_entropy=None,
                                 expected_entropy=None, mutual_information=None)] if first is not None else []
        return GenerationUncertainty(
            tokens=head + [TokenUncertainty(token=self._piece(t.token_id), logprob=t.logprob,
                                            predictive_entropy=t.predictive_entropy,
                                            expected_entropy=t.expected_entropy,
                                            mutual_information=t.mutual_information) for t in tokens],
            sequence=SequenceUncertainty(**summary) if summary is not None else None,
            num_samples=num_samples, sigma=self.model.sigma)

    def _piece(self, token_id: int) -> str:
        """A token's own text (for per-token uncertainty and logprobs), decoded once per token id."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return piece


class CompletionServing(GenerationServing):
    """``POST /v1/completions``: one or more prompts (texts, tokenized as they are, or token ids);
    with ``echo``, each prompt is also scored token by token (a :class:`~server.engine.protocol.ScoreWork`
    beside its generation) and returned before the completion."""

    endpoint, id_prefix, param, items_param = COMPLETIONS_ENDPOINT, "cmpl", "prompt", "prompt"

    def prompt_count(self, request: CompletionRequest) -> int:
        return len(request.prompts)

    def prompt_chars(self, request: CompletionRequest) -> int:
        return max((len(t) for t in request.prompts if isinstance(t, str)), default=0)

    def tokenize(self, request: CompletionRequest) -> list[list[int]]:
        vocab = len(self.tokenizer)
        for ids in request.prompts:
            bad = next((i for i in ids if not 0 <= i < vocab), None) if not isinstance(ids, str) else None
            if bad is not None:
                raise BadRequest(f"'prompt' holds the token id {bad}, outside the model's vocabulary: allowed "
                                 f"0 to {vocab - 1}", param="prompt", code="invalid_value")
        return [self.tokenizer(t).input_ids if isinstance(t, str) else list(t) for t in request.prompts]

    async def create(self, request: CompletionRequest, report: Callable[[str], None] = lambda status: None):
        if not request.echo:
            return await super().create(request, report)
        self.check(request)
        works, prompts = await self.tokenizing.run(self.prepare, request)
        deadline = works[0].deadline if works else time.monotonic() + self.settings.request_timeout
        scores = [self.score_work(request, p, deadline) for p in prompts]
        futures = self.engine.submit(scores + works)
        self.metrics.prompt_tokens.labels(self.metrics.model).inc(sum(len(p) for p in prompts) * request.n)
        try:
            results = await self.engine.wait(futures, self.settings.request_timeout)
        finally:
            for f in futures:
                f.cancel()
        scored, gens = results[:len(scores)], results[len(scores):]
        choices = []
        for i, prompt in enumerate(prompts):
            for j in range(request.n):
                gen = gens[i * request.n + j] if gens else None
                choices.append(self.echo_choice(request, len(choices), prompt, request.prompts[i], scored[i], gen,
                                                scores[i].num_samples))
        p = sum(len(x) for x in prompts) * request.n
        c = sum(len(g.tokens) for g in gens)
        usage = CompletionUsage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
        return self.response_of(f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time()), choices, usage)

    def score_work(self, request: CompletionRequest, prompt: list[int], deadline: float) -> ScoreWork:
        """The scoring of an echoed prompt; 400 if its forward would pad more tokens than an item may."""
        K = request.num_samples or self.settings.samples
        limit = self.settings.item_token_limit
        if K * len(prompt) > limit:
            raise BadRequest(f"scoring the echoed prompt needs {K} rows (num_samples) x {len(prompt)} tokens = "
                             f"{K * len(prompt)} padded tokens; at most {limit} are allowed per item (the server's "
                             f"--max-item-tokens): send a shorter prompt or fewer num_samples", param="prompt",
                             code="item_too_large")
        return ScoreWork(list(prompt), self.model.config.seed, K, request.logprobs or 0, deadline)

    def echo_choice(self, request: CompletionRequest, index: int, prompt: list[int], given: str | list[int],
                    scored: list[TokenInfo], gen: Generated | None, K: int) -> CompletionChoice:
        """The prompt (as given, or its ids decoded) and its scores, then the completion's (if any)."""
        text = given if isinstance(given, str) else self.tokenizer.decode(prompt)
        tokens = scored + (gen.tokens if gen is not None else [])
        unc = self._uncertainty(K, tokens, TokenInfo.summarize(tokens), first=prompt[0])
        return CompletionChoice(index=index, text=text + (gen.text if gen is not None else ""),
                                finish_reason=gen.finish_reason if gen is not None else "length",
                                logprobs=self._logprobs(tokens, request.logprobs, first=prompt[0])
                                if request.logprobs is not None else None, uncertainty=unc)

    def choice(self, request: CompletionRequest, index: int, gen: Generated) -> CompletionChoice:
        return CompletionChoice(index=index, text=gen.text, finish_reason=gen.finish_reason,
                                logprobs=self._logprobs(gen.tokens, request.logprobs)
                                if request.logprobs is not None else None,
                                uncertainty=self._uncertainty(gen.num_samples, gen.tokens, gen.summary))

    def response_of(self, rid, created, choices, usage) -> CompletionResponse:
        return CompletionResponse(id=rid, created=created, model=self.model_id, choices=choices, usage=usage)

    def chunk(self, request: CompletionRequest, rid, created, index, text, tokens, reason, uncertainty,
              offset) -> CompletionResponse:
        return CompletionResponse(id=rid, created=created, model=self.model_id, choices=[
            CompletionChoice(index=index, text=text, finish_reason=reason, uncertainty=uncertainty,
                             logprobs=self._logprobs(tokens, request.logprobs, offset)
                             if request.logprobs is not None and tokens else None)])

    def usage_chunk(self, rid, created, usage) -> CompletionResponse:
        return CompletionResponse(id=rid, created=created, model=self.model_id, choices=[], usage=usage)

    def wants_offsets(self, request: CompletionRequest) -> bool:
        return request.logprobs is not None

    def _logprobs(self, tokens: list[TokenInfo], top: int, offset: int = 0,
                  first: int | None = None) -> CompletionLogprobs:
        """``first``: an echoed prompt's first token, listed first with null numbers."""
        head = [first] if first is not None else []
        pieces = [self._piece(i) for i in head] + [self._piece(t.token_id) for t in tokens]
        offsets, at = [], offset
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        def column(name: str) -> list:
            return [None for _ in head] + [getattr(t, name) for t in tokens]

        return CompletionLogprobs(
            tokens=pieces, token_logprobs=column("logprob"),
            top_logprobs=[None for _ in head] + [{self._piece(i): lp for i, lp in t.top} for t in tokens]
            if top else None,
            text_offset=offsets, predictive_entropy=column("predictive_entropy"),
            expected_entropy=column("expected_entropy"), mutual_information=column("mutual_information"))


class ChatServing(GenerationServing):
    """``POST /v1/chat/completions``: one conversation, rendered with the chat template."""

    endpoint, id_prefix, param, items_param = CHAT_ENDPOINT, "chatcmpl", "messages", "n"

    def prompt_count(self, request: ChatCompletionRequest) -> int:
        return 1

    def prompt_chars(self, request: ChatCompletionRequest) -> int:
        return sum(len(m.text) for m in request.messages)

    def tokenize(self, request: ChatCompletionRequest) -> list[list[int]]:
        try:
            text = encoding.apply_chat(self.tokenizer, [{"role": "system" if m.role == "developer" else m.role,
                                                "content": m.text} for m in request.messages])
        except TFBError as e:
            raise BadRequest(f"'messages': {e}", param="messages") from None
        return [self.tokenizer(text, add_special_tokens=False).input_ids]

    def choice(self, request: ChatCompletionRequest, index: int, gen: Generated) -> ChatChoice:
        unc = self._uncertainty(gen.num_samples, gen.tokens, gen.summary)
        if request.response_format is not None and request.response_format.is_json:
            fields = TokenInfo.field_uncertainty(gen.text, [self._piece(t.token_id) for t in gen.tokens], gen.tokens)
            unc.fields = {k: FieldUncertainty(**v) for k, v in fields.items()} if fields is not None else None
        return ChatChoice(index=index, message=ChatMessageOut(content=gen.text), finish_reason=gen.finish_reason,
                          logprobs=self._logprobs(gen.tokens) if request.logprobs else None, uncertainty=unc)

    def grammar(self, request: ChatCompletionRequest) -> str | None:
        """A JSON response_format's grammar (compiled here, on the tokenizing thread; milliseconds)."""
        fmt = request.response_format
        if fmt is None or not fmt.is_json:
            return None
        try:
            return SamplingParams.json_grammar(fmt.target_schema)
        except TFBError as e:
            raise BadRequest(f"'response_format.json_schema.schema': {e}", param="response_format.json_schema.schema",
                             code="invalid_value") from None

    def response_of(self, rid, created, choices, usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=rid, created=created, model=self.model_id, choices=choices, usage=usage)

    def opening_chunks(self, rid, created, n) -> list[ChatCompletionChunk]:
        return [ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=[
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))]) for i in range(n)]

    def chunk(self, request: ChatCompletionRequest, rid, created, index, text, tokens, reason, uncertainty,
              offset) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=[
            ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=reason,
                            logprobs=self._logprobs(tokens) if request.logprobs and tokens else None,
                            uncertainty=uncertainty)])

    def usage_chunk(self, rid, created, usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=rid, created=created, model=self.model_id, choices=[], usage=usage)

    def _logprobs(self, tokens: list[TokenInfo]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            piece = self._piece(token_id)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

        return ChatLogprobs(content=[ChatTokenLogprob(**entry(t.token_id, t.logprob),
                                                      top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in t.top],
                                                      predictive_entropy=t.predictive_entropy,
                                                      expected_entropy=t.expected_entropy,
                                                      mutual_information=t.mutual_information)
                                     for t in tokens])


def _sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"
