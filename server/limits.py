"""Bounded work per request, checked before anything expensive, off the event loop.

Counts and sizes are checked before a text is tokenized; a text is tokenized only if it could
fit the context and the item's token budget (:class:`TokenBound`: the fewest tokens its
characters can take); tokenizing runs on one thread of its own (:class:`Tokenizing`) so a long
text never holds up ``/health`` or other requests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from .errors import BadRequest

T = TypeVar("T")
log = logging.getLogger(__name__)

# normalizers that never make a text shorter, and pre-tokenizers that drop no character
KEEPING_NORMALIZERS = {"Prepend", "NFD", "NFKD", "Lowercase"}
COMPOSING_NORMALIZERS = {"NFC", "NFKC"}  # compose at most max_composed() characters into one
KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


@dataclass(frozen=True)
class TokenBound:
    """The fewest tokens a text of ``n`` characters can take with one tokenizer:
    ``ceil(n / chars_per_token)``, where no token covers more characters than its longest
    vocabulary entry (byte-level vocabularies: one character per byte, and a text's character
    is at least one byte) times what its normalizer may compose into one character.

    ``chars_per_token`` is None when no such bound holds (a normalizer or pre-tokenizer that
    may drop characters, unknown words fused into one token): texts are then checked only
    after tokenizing.
    """

    chars_per_token: int | None

    @classmethod
    def of(cls, tokenizer) -> "TokenBound":
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        factor = _shrink_factor(tokenizer)
        if factor is None:
            log.warning("this tokenizer may map many characters to one token (its normalizer, pre-tokenizer "
                        "or unknown-word handling): request texts are checked against the context only "
                        "after tokenizing")
            return cls(None)
        return cls(max(longest, 1) * factor)

    def min_tokens(self, chars: int) -> int:
        return 0 if self.chars_per_token is None else -(-chars // self.chars_per_token)


def _shrink_factor(tokenizer) -> int | None:
    """How many characters of a text at most become one character of what the tokenizer's model
    sees (1: none is dropped or merged), or None: unbounded or unknown."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: nothing to inspect
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "BPE":
        if model.get("fuse_unk") and model.get("unk_token") is not None and not model.get("byte_fallback"):
            return None  # a run of unknown characters is one token
    elif not (model.get("type") == "Unigram" and model.get("byte_fallback")):
        return None  # WordPiece / WordLevel: a whole unknown word is one token
    if not all(p.get("type") in KEEPING_PRE_TOKENIZERS and p.get("behavior") != "Removed"
               for p in _steps(spec.get("pre_tokenizer"), "pretokenizers")):
        return None
    factor = 1
    for n in _steps(spec.get("normalizer"), "normalizers"):
        if n["type"] in COMPOSING_NORMALIZERS:
            factor *= max_composed()
        elif n["type"] == "Replace":
            pattern = n.get("pattern", {})
            if "String" not in pattern or len(n.get("content", "")) < len(pattern["String"]):
                return None  # a regex, or a shorter replacement
        elif n["type"] not in KEEPING_NORMALIZERS:
            return None  # Strip, StripAccents, BertNormalizer, Precompiled (SentencePiece's map), ...
    return factor


def _steps(spec: dict | None, key: str) -> list[dict]:
    """A normalizer's or pre-tokenizer's steps (a Sequence's members, flattened)."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [s for member in spec.get(key, []) for s in _steps(member, key)]
    return [spec]


@functools.lru_cache(maxsize=1)
def max_composed() -> int:
    """The most characters Unicode composition turns into one (4: the longest canonical
    decomposition, e.g. U+1F82)."""
    return max(len(unicodedata.normalize("NFD", chr(i))) for i in range(0x110000) if not 0xD800 <= i < 0xE000)


def check_chars(chars: int, bound: TokenBound, param: str, context: int, what: str = "") -> None:
    """400 for a text of ``chars`` characters that cannot fit the context whatever its tokens."""
    tokens = bound.min_tokens(chars)
    if tokens > context:
        raise BadRequest(f"'{param}'{what} is {chars} characters long: at least {tokens} tokens with this "
                         f"model's tokenizer (at most {bound.chars_per_token} characters per token), more "
                         f"than its context of {context} tokens", param=param, code="context_length_exceeded")


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
