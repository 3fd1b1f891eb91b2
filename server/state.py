"""What one app holds at run time: settings, metrics, status, and (once loaded) the model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

from .engine.client import EngineClient
from .loader import ServedModel
from .metrics import Metrics
from .settings import Settings

if TYPE_CHECKING:  # the serving classes import the engine's client, not this module
    from .generating import ChatServing, CompletionServing
    from .serving import ChoicesServing
    from .tokenizer_api import TokenizerServing

Status = Literal["loading", "searching", "ready", "draining", "failed"]


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    model_id: str
    base_name: str
    status: Status = "loading"
    detail: str | None = None  # why not ready (a failed start-up's reason)
    model: ServedModel | None = None  # what the API serves of the posterior (once ready)
    engine: EngineClient | None = None  # in this process or in its own (from the start of loading)
    choices: ChoicesServing | None = None
    completions: CompletionServing | None = None
    chat: ChatServing | None = None
    tokenizer: TokenizerServing | None = None
    started: float = field(default_factory=time.time)
    # called with the reason when start-up fails (the CLI stops the server and exits non-zero)
    on_fatal: Callable[[str], None] | None = None
    # called once the model is loaded and serving (the CLI freezes the heap: server.lifecycle.freeze_heap)
    on_ready: Callable[[], None] | None = None
