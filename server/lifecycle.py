"""The server's start-up and shutdown helpers, shared by the API process and the engine process."""

from __future__ import annotations

import gc
import logging
import os

log = logging.getLogger("server.app")


def failure_reason(e: BaseException) -> str:
    """A start-up failure in one line."""
    reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
    return " ".join(reason.split())


def freeze_heap() -> None:
    """Put every object alive after start-up (the model, torch, transformers: hundreds of
    thousands) out of the cyclic garbage collector's reach, as vLLM does. Each full collection
    otherwise scans them all, holding the GIL for tens of milliseconds (every stream stalls),
    and the objects each generated token makes trigger one every few seconds under load. For
    a process that serves one model for its life (the CLI, a Ray replica), not for one that
    builds many apps (the tests): frozen objects are never collected."""
    gc.collect()
    gc.freeze()
    log.info("%d start-up objects frozen out of the garbage collector's scans (process %d)", gc.get_freeze_count(),
             os.getpid())
