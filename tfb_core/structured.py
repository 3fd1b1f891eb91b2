"""Structured output: the generated text matches a JSON schema (or is any JSON object), by construction.

The constraint acts on the token *choice* only: at each step the tokens the grammar forbids get
probability 0 in the distribution the token is picked from (greedy or sampled). The token's
logprob, its entropies and its mutual information stay those of the unconstrained model average:
what the posterior itself thinks of the token, so a field the model is unsure of shows it.

The grammar library is llguidance (no dependencies; a schema compiles lazily in milliseconds and
each step's mask takes microseconds on a CPU). A grammar is a string (it travels to the engine
process as one); each sequence gets its own :class:`Constraint` on the engine's side.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from .errors import TFBError

_TOKENIZERS: dict[tuple[int, int], object] = {}  # (id of the HF tokenizer, vocabulary) -> llguidance's
# json.dumps' layout: no free whitespace (a model may otherwise emit whitespace until max_tokens);
# a schema's own "x-guidance" options override these
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_grammar(schema: dict | None) -> str:
    """The grammar for ``schema`` (None: any JSON object); TFBError naming why llguidance refuses it."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                     defaults=COMPACT)
    except ValueError as e:
        raise TFBError(f"not a JSON schema: {e}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise TFBError(f"this JSON schema cannot be enforced: {error}")
    return grammar


def lltokenizer(post):
    """llguidance's view of the posterior's tokenizer, over the model's whole output vocabulary
    (made once: about half a second)."""
    from llguidance.hf import from_tokenizer

    vocab = output_vocab(post.model)
    key = (id(post.tokenizer), vocab)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = from_tokenizer(post.tokenizer, n_vocab=vocab)
    return _TOKENIZERS[key]


def output_vocab(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


class Constraint:
    """One sequence's place in its grammar: the tokens allowed next, and the tokens consumed."""

    def __init__(self, post, grammar: str):
        from llguidance import LLMatcher

        self.vocab = output_vocab(post.model)
        self.matcher = LLMatcher(lltokenizer(post), grammar)
        if self.matcher.is_error():
            raise TFBError(f"the grammar failed to start: {self.matcher.get_error()}")

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next (an end-of-sequence token once it may end)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab].astype(bool))

    def consume(self, token: int) -> str | None:
        """Advance past ``token``; the error when the grammar refuses it (never for a token it allowed)."""
        return None if self.matcher.consume_token(token) else self.matcher.get_error() or "token refused"

    @property
    def stopped(self) -> bool:
        """No token can follow (the text is complete)."""
        return self.matcher.is_stopped()


def top_level_spans(text: str) -> dict[str, tuple[int, int]] | None:
    """Each top-level field of the JSON object ``text``: (start, end) of its value's characters;
    None if ``text`` is not one JSON object."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    try:
        i = skip(0)
        if text[i:i + 1] != "{":
            return None
        spans, i = {}, skip(i + 1)
        if text[i:i + 1] == "}":
            return spans if not text[skip(i + 1):] else None
        while True:
            key, i = decoder.raw_decode(text, i)
            i = skip(i)
            if text[i:i + 1] != ":":
                return None
            start = skip(i + 1)
            _, end = decoder.raw_decode(text, start)
            spans[str(key)] = (start, end)
            i = skip(end)
            if text[i:i + 1] == ",":
                i = skip(i + 1)
                continue
            if text[i:i + 1] == "}" and not text[skip(i + 1):]:
                return spans
            return None
    except (ValueError, IndexError):
        return None


def field_uncertainty(text: str, pieces: list[str], tokens: list[Any]) -> dict[str, dict] | None:
    """Per top-level field of the JSON object ``text``: the mean and max mutual information (and
    predictive entropy) over the tokens whose characters overlap its value. ``pieces``: each
    token's text, in order (their characters laid end to end locate the tokens); ``tokens``:
    their :class:`~tfb_core.generation.TokenInfo`. None if ``text`` is not a JSON object."""
    spans = top_level_spans(text)
    if spans is None:
        return None
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += len(piece)
    out = {}
    for key, (start, end) in spans.items():
        inside = [t for t, s, piece in zip(tokens, starts, pieces) if s < end and s + max(len(piece), 1) > start]
        mi = [t.mutual_information for t in inside] or [0.0]
        pe = [t.predictive_entropy for t in inside] or [0.0]
        out[key] = {"num_tokens": len(inside), "mean_mutual_information": float(sum(mi) / len(mi)),
                    "max_mutual_information": float(max(mi)), "mean_predictive_entropy": float(sum(pe) / len(pe)),
                    "max_predictive_entropy": float(max(pe))}
    return out
