"""Thin routers: each endpoint checks access, calls the serving layer, returns its model."""

from __future__ import annotations

import asyncio
import contextlib
import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from .access_log import note_work
from .errors import ClientClosed, NotFound, NotReady, Unauthorized
from .generating import EventStream
from .metrics import CONTENT_TYPE
from .openai_protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                              CompletionResponse, DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                              TokenizeResponse, TokenizerInfo)
from .protocol import (ChoiceResult, ChoicesBatchResponse, ChoicesRequest, ErrorResponse, Health,
                       ModelCard, ModelList, PosteriorInfo, SearchPointOut)
from .loader import public_name
from .state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.tfb


async def require_api_key(request: Request) -> None:
    """With ``--api-key`` set: ``Authorization: Bearer KEY``, compared in constant time. (The
    dependencies are ``async``: FastAPI would run a plain function on a thread of its pool,
    two thread hops per request.)"""
    check_api_key(get_state(request).settings.api_key, request.headers.get("authorization", ""))


def check_api_key(key: str | None, authorization: str) -> None:
    """Raise Unauthorized unless ``authorization`` is ``Bearer KEY`` (any, when ``key`` is None)."""
    if key is None:
        return
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer KEY'",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise Unauthorized("invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def serving_status(state: AppState) -> tuple[str, str | None]:
    """(status, detail): the state's, but "failed" as soon as the engine process is no longer
    alive, before its closed connection is handled."""
    engine = state.engine
    if state.status == "ready" and engine is not None and not engine.alive:
        return "failed", "the engine process has exited"
    return state.status, state.detail


async def require_ready(request: Request) -> AppState:
    state = get_state(request)
    status, detail = serving_status(state)
    if status != "ready":
        raise NotReady(f"the server is {status}" + (f": {detail}" if detail else "")
                       + "; retry when GET /health answers 200", code=status, headers={"Retry-After": "1"})
    return state


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503, 504)}

health = APIRouter(tags=["health"])
api = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


@health.get("/health", response_model=Health, responses={503: {"model": Health}})
async def get_health(request: Request) -> JSONResponse:
    """200 when ready; 503 while loading, searching, draining, after a failed start-up, or once
    the engine process has exited."""
    status, detail = serving_status(get_state(request))
    body = Health(status=status, detail=detail).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@health.head("/health", include_in_schema=False)
async def head_health(request: Request) -> JSONResponse:
    """The status code of GET /health, without its body (load balancers that probe with HEAD)."""
    return await get_health(request)


@api.post("/v1/choices", response_model=ChoiceResult | ChoicesBatchResponse, response_model_exclude_none=True,
          tags=["choices"])
async def create_choices(request: Request, body: ChoicesRequest, state: AppState = Depends(require_ready)):
    """Answer probabilities with their uncertainty, for one item or ``{"items": [...]}``."""
    items = getattr(body, "items", None) or [body]
    note_work(request, len(items), max(it.num_samples or state.settings.samples for it in items))
    return await unless_disconnected(request, state.choices.create(body))


SSE = {"content": {"text/event-stream": {}}, "description": "with stream: true, server-sent events "
       "in OpenAI's chunk format, ending in data: [DONE]"}


@api.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True,
          tags=["generation"], responses={200: SSE})
async def create_completion(request: Request, body: CompletionRequest, state: AppState = Depends(require_ready)):
    """Text from the model average of K weight samples, with per-token uncertainty."""
    note_work(request, len(body.prompts) * body.n, body.num_samples or state.settings.samples)
    return _answer(await unless_disconnected(request, state.completions.create(body, reporter(request))))


@api.post("/v1/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_none=True,
          tags=["generation"], responses={200: SSE})
async def create_chat_completion(request: Request, body: ChatCompletionRequest,
                                 state: AppState = Depends(require_ready)):
    """A chat reply (the tokenizer's chat template) with per-token uncertainty."""
    note_work(request, body.n, body.num_samples or state.settings.samples)
    return _answer(await unless_disconnected(request, state.chat.create(body, reporter(request))))


async def unless_disconnected(request: Request, work):
    """Await ``work``; if the client goes away first, cancel it (its queued and running items
    are dropped at the next step) and raise ClientClosed. A stream's own disconnects are
    handled by its response (server.generating.GenerationServing.stream)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientClosed("the client closed the connection; its work was dropped", code="client_closed")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def reporter(request: Request):
    """``report(status)``: how a stream ended, for the request metrics (server.app.MetricsMiddleware)."""
    def report(status: str) -> None:
        request.state.tfb_status = status
    return report


def _answer(result):
    if isinstance(result, EventStream):
        return EventStreamResponse(result, media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return result


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose work ends with the response, however it ends: also when the
    client left before the body started (Starlette then never runs the events' generator)."""

    def __init__(self, stream: EventStream, **kwargs):
        super().__init__(stream, **kwargs)
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # ASGI 2.4: send() raised; nobody is left to answer
            pass
        finally:
            self.stream.close()


@api.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(get_state(request))])


@api.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["models"])
async def get_model(request: Request, model_id: str) -> ModelCard:
    """The served model's card (OpenAI's ``models.retrieve``); any other id is a 404."""
    state = get_state(request)
    if model_id != state.model_id:
        raise NotFound(f"model {model_id!r} does not exist; this server serves {state.model_id!r}",
                       param="model", code="model_not_found")
    return model_card(state)


def model_card(state: AppState) -> ModelCard:
    show = state.settings.show_paths
    return ModelCard(id=state.model_id, created=int(state.started), root=public_name(state.base_name, show),
                     adapter=public_name(state.model.adapter, show) if state.model else None,
                     files_sha256=dict(state.model.config.files_sha256) if state.model else None)


@api.post("/tokenize", response_model=TokenizeResponse, tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, state: AppState = Depends(require_ready)) -> TokenizeResponse:
    """vLLM's: a text's (or chat turns') token ids."""
    return await state.tokenizer.tokenize(body)


@api.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, state: AppState = Depends(require_ready)) -> DetokenizeResponse:
    """vLLM's: token ids' text."""
    return await state.tokenizer.detokenize(body)


@api.get("/tokenizer_info", response_model=TokenizerInfo, tags=["tokenizer"])
async def tokenizer_info(state: AppState = Depends(require_ready)) -> TokenizerInfo:
    """vLLM's: the tokenizer's configuration (special tokens, chat template, context)."""
    return state.tokenizer.info()


@api.get("/v1/posterior", response_model=PosteriorInfo, tags=["models"])
async def get_posterior(state: AppState = Depends(require_ready)) -> PosteriorInfo:
    model, cfg = state.model, state.model.config
    show = state.settings.show_paths
    base_model = {**cfg.base_model, "name": public_name(cfg.base_model.get("name"), show)}
    return PosteriorInfo(
        model=state.model_id, base_model=base_model, adapter=public_name(model.adapter, show),
        files_sha256=dict(cfg.files_sha256), sigma=model.sigma,
        num_samples=state.settings.samples, max_samples=state.settings.max_samples,
        criterion=cfg.criterion, eps=cfg.eps, seed=cfg.seed, mode=state.choices.defaults.mode,
        chat=state.choices.defaults.chat, temperature=model.temperature,
        length_normalize=bool(cfg.length_normalize), stochastic_layers=cfg.stochastic_layers,
        calibration=state.choices.calibration_info(),
        confidence=state.choices.confidence.to_dict(), fit_report=cfg.fit_report,
        search_trace=[SearchPointOut(**p) for p in cfg.search_trace],
        calibration_sha256=cfg.calibration_sha256, source=model.source)


@api.get("/metrics", response_class=Response, tags=["metrics"],
         responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text exposition"}})
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.exposition(), media_type=CONTENT_TYPE)
