"""Bounded work per request, checked before anything expensive, off the event loop.

Counts and sizes are checked before a text is tokenized; a text is tokenized only if it could
fit the context (:func:`max_prompt_chars`); tokenizing runs on one thread of its own
(:class:`Tokenizing`) so a long text never holds up ``/health`` or other requests.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from .errors import BadRequest

T = TypeVar("T")


def max_prompt_chars(tokenizer, context: int) -> int:
    """A text longer than this cannot fit ``context`` tokens: no token covers more characters
    than its own vocabulary string has (byte-level and SentencePiece vocabularies alike)."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return context * max(longest, 1)


def check_chars(chars: int, limit: int, param: str, context: int) -> None:
    """400 for a text of ``chars`` characters that is too long to fit the context whatever its tokens."""
    if chars > limit:
        raise BadRequest(f"'{param}' is {chars} characters long; it cannot fit the model's context "
                         f"of {context} tokens (at most {limit} characters are read)", param=param,
                         code="context_length_exceeded")


def check_samples(K: int, limit: int, param: str = "num_samples") -> None:
    """400 for a request asking for more weight samples than the server's --max-samples."""
    if K > limit:
        raise BadRequest(f"'{param}' is {K}; allowed: 1 to {limit}", param=param, code="invalid_value")


class Tokenizing:
    """The event loop's tokenizer, used on one thread of its own: HF fast tokenizers must not
    be used from two threads at once, and a long text must not block the event loop."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tfb-tokenize")

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
