"""What crosses between the API side and the engine: work items in, outputs out, as typed data.

The API side sends :class:`AddRequest` (a request's work items, all or none), :class:`Abort`,
:class:`Pause`, :class:`Resume` and :class:`Stop`; the engine answers with one
:class:`EngineOutputs` per step (in the engine process: per turn of its event loop), holding
per work item a :class:`TokenDelta` (a streamed sequence's new token), :class:`Finished` (its
result) or :class:`Failed` (its error), and the engine's :class:`EngineStats`. The same types
are used whether the engine runs in this process or in its own (server/engine/client.py).

A work item is plain data with an ``id`` the API side gives it; its future and event queue
stay on the API side (server/engine/client.py, ``Requests``). A generation's
:class:`~tfb_core.GenSequence` lives only in the engine: the API side receives what a
response needs (:class:`TokenDelta`, :class:`Generated`).
"""

from __future__ import annotations

import asyncio
import copyreg
import enum
import io
import logging
import pickle
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from tfb_core import SamplingParams, TokenInfo, encoding

log = logging.getLogger(__name__)
HEADER = struct.Struct("!I")  # a message's length in bytes


class WorkKind(str, enum.Enum):
    """What a work item asks of the model; items of one kind share a forward."""

    CHOICE = "choice"  #: a /v1/choices item: choice probabilities over K samples
    SCORE = "score"  #: an echoed prompt, scored token by token
    GENERATE = "generate"  #: a sequence to generate (joins the running decode batch)


# --- work items ----------------------------------------------------------------------------------


@dataclass(eq=False)
class ChoiceWork:
    """One multiple-choice item, tokenized, waiting for its forward."""

    encoded: encoding.Encoded
    seed: int
    num_samples: int
    deadline: float  # time.monotonic() after which the work is dropped
    arrived: float = field(default_factory=time.monotonic)
    id: int = -1  # given by the API side's client at submit
    kind = WorkKind.CHOICE

    @property
    def rows(self) -> int:
        return len(self.encoded.sequences) * self.num_samples

    @property
    def length(self) -> int:
        return max(len(s) for s in self.encoded.sequences)


@dataclass(eq=False)
class ScoreWork:
    """One prompt to score token by token (``/v1/completions`` with ``echo``); its result is the
    prompt's list of :class:`~tfb_core.TokenInfo` (every token but the first)."""

    prompt_ids: list[int]
    seed: int
    num_samples: int
    top_logprobs: int
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    id: int = -1
    kind = WorkKind.SCORE

    @property
    def rows(self) -> int:
        return self.num_samples

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


@dataclass(eq=False)
class GenWork:
    """One sequence to generate (a request's choice ``index``); with ``streamed`` each new token
    is sent as a :class:`TokenDelta`, and its result is a :class:`Generated`."""

    prompt_ids: list[int]
    params: SamplingParams
    endpoint: str
    deadline: float
    index: int = 0  # the choice's index in its request
    streamed: bool = False
    kv_rows: int = 0  # the KV cache rows it holds (ServedModel.kv_rows); 0: its K (every layer stochastic)
    arrived: float = field(default_factory=time.monotonic)
    id: int = -1
    kind = WorkKind.GENERATE

    def __post_init__(self):
        self.kv_rows = self.kv_rows or self.params.num_samples

    @property
    def rows(self) -> int:
        """Its prompt's rows in a prefill forward (the token budget): K."""
        return self.params.num_samples

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


Work = Union[ChoiceWork, ScoreWork, GenWork]


# --- results -------------------------------------------------------------------------------------


@dataclass
class ChoiceOutput:
    """An item's per-sample probabilities and their reduction."""

    samples: torch.Tensor  # (K, C), untempered
    probs: torch.Tensor  # (C,) the tempered model average
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float


@dataclass
class Generated:
    """A finished generation: what a response reads of it."""

    tokens: list[TokenInfo]
    text: str  # the generated text, without a matched stop string
    finish_reason: str  # "stop" | "length"
    summary: dict  # tfb_core.summarize over the tokens
    num_samples: int


# --- API side -> engine --------------------------------------------------------------------------


@dataclass
class AddRequest:
    """A request's work items, queued all or none; ``number`` counts the submits (the engine's
    stats say the last one it took, so the API side knows what its depth includes)."""

    number: int
    works: list[Work]


@dataclass
class Abort:
    """Work the API side gave up (its client left, it timed out): dropped at the next step."""

    ids: list[int]


@dataclass
class Pause:
    """Take no more work and run no more steps until :class:`Resume`."""


@dataclass
class Resume:
    pass


@dataclass
class Stop:
    """Drain (answer what was taken), then stop."""


EngineInput = Union[AddRequest, Abort, Pause, Resume, Stop]


# --- engine -> API side --------------------------------------------------------------------------


@dataclass
class TokenDelta:
    """A streamed sequence's new token: what its next chunk shows."""

    id: int
    token: TokenInfo  # id, logprob, top logprobs, PE / EE / MI, per-sample logprobs
    text: str  # new text that may be shown (held back near a possible stop string)
    finish_reason: str | None = None
    summary: dict | None = None  # with the last token


@dataclass
class Finished:
    """A work item's result: :class:`ChoiceOutput`, a scored prompt's list of TokenInfo, or :class:`Generated`
    (None for a streamed one: its tokens went as :class:`TokenDelta`\ s)."""

    id: int
    result: object


@dataclass
class Failed:
    """A work item's error (an :class:`~server.errors.APIError`, sent as it is)."""

    id: int
    error: BaseException


@dataclass
class MetricCall:
    """A recording call of the engine's metrics (``observe_*``, ``set_*``), replayed by the API side's."""

    name: str
    args: tuple
    kwargs: dict


@dataclass
class EngineStats:
    """The engine's state with each output: its queue, the submits it took, its KV rows, and (from
    the engine process) its metric calls since the last outputs."""

    depth: int = 0  # items waiting
    seen: int = 0  # the last AddRequest.number taken
    kv_rows: int = 0
    metrics: list[MetricCall] = field(default_factory=list)


Output = Union[TokenDelta, Finished, Failed]


@dataclass
class EngineOutputs:
    outputs: list[Output]
    stats: EngineStats


@dataclass
class Ready:
    """The engine process loaded: what the API serves of the model, and the settings it resolved."""

    model: object  # server.loader.ServedModel
    settings: object  # server.settings.Settings


@dataclass
class Status:
    """The engine process's start-up status ("loading", "searching")."""

    status: str


@dataclass
class StartFailed:
    """The engine process could not start; it exits next."""

    reason: str


EngineMessage = Union[EngineOutputs, Ready, Status, StartFailed]


# --- pickling ------------------------------------------------------------------------------------


def _tensor_as_array(t: torch.Tensor):
    """A tensor pickled as its numpy array: torch's own reduction goes through ``torch.load``
    and costs several times more each way, and every answer carries small tensors (its
    per-sample probabilities). It crosses on the CPU: the API process never touches the GPU.
    A dtype numpy lacks (bfloat16) or a sparse tensor crosses as torch pickles it."""
    t = t.detach().cpu().resolve_conj().resolve_neg()
    if t.layout is torch.strided and t.dtype is not torch.bfloat16:
        try:
            return torch.from_numpy, (t.numpy(),)
        except (RuntimeError, TypeError):  # a dtype numpy lacks
            pass
    return t.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def dumps(obj) -> bytes:
    """``obj`` pickled for the other process (:func:`receive` loads it)."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    # copyreg's table as it is now, plus tensors; a dict (a ChainMap's lookups, in Python, made
    # a step's 64 events twice as slow to pickle)
    pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _tensor_as_array}
    pickler.dump(obj)
    return buf.getvalue()


async def receive(reader: asyncio.StreamReader) -> list | None:
    """The next message (a list), or None once the other process has gone."""
    try:
        size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class Outbox:
    """Messages for the other process: :meth:`put` from any thread; the loop sends everything
    put since its last turn as one message (a list). ``pack(messages)`` may merge them first
    (the engine merges its outputs into one :class:`EngineOutputs` with its stats);
    ``unpicklable(message, error)`` says what stands for a message that does not pickle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter,
                 pack: Callable[[list], list] = lambda messages: messages,
                 unpicklable: Callable[[object, Exception], object | None] = lambda message, error: None):
        self.loop, self.writer, self.pack, self.unpicklable = loop, writer, pack, unpicklable
        self._items: list = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._loop_thread = threading.get_ident()

    def put(self, message) -> None:
        with self._lock:
            self._items.append(message)
            if self._scheduled:
                return
            self._scheduled = True
        if threading.get_ident() == self._loop_thread:
            self.loop.call_soon(self.flush)
        else:
            self.loop.call_soon_threadsafe(self.flush)

    async def close(self) -> None:
        """Send what is left, then close."""
        self.flush()
        await self.writer.drain()
        self.writer.close()

    def flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        if self.writer.is_closing():
            return
        items = self.pack(items)
        try:
            data = dumps(items)
        except Exception:  # one message that does not pickle costs only itself
            items = [m for m in (self._pickled(m) for m in items) if m is not None]
            data = dumps(items)
        self.writer.write(HEADER.pack(len(data)) + data)

    def _pickled(self, message):
        """``message`` if it pickles; else what stands for it (an EngineOutputs: each output that does not)."""
        try:
            dumps(message)
            return message
        except Exception as e:
            if isinstance(message, EngineOutputs):
                outputs = [self._pickled(o) for o in message.outputs]
                return EngineOutputs([o for o in outputs if o is not None], message.stats)
            log.exception("a %s message does not pickle", type(message).__name__)
            return self.unpicklable(message, e)
