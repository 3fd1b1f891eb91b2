"""What one app holds at run time: settings, metrics, status, and (once loaded) the model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from .loader import Loaded, ServedModel
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import Settings

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
    loaded: Loaded | None = None  # the posterior itself, when the engine runs in this process
    scheduler: Scheduler | None = None  # or, the engine in its own process (the default), its EngineClient
    choices: object | None = None  # serving.ChoicesServing
    completions: object | None = None  # generating.CompletionServing
    chat: object | None = None  # generating.ChatServing
    tokenizer: object | None = None  # tokenizer_api.TokenizerServing
    runner: object | None = None  # engine.ModelRunner, when the engine runs in this process
    engine: object | None = None  # engine_process.EngineClient, the engine in its own process (from its start)
    started: float = field(default_factory=time.time)
    # called with the reason when start-up fails (the CLI stops the server and exits non-zero)
    on_fatal: Callable[[str], None] | None = None
    # called once the model is loaded and serving (the CLI freezes the heap: server.app.freeze_heap)
    on_ready: Callable[[], None] | None = None
