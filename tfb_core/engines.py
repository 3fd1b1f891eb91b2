"""Which engine runs a posterior, picked from the model and its device.

- ``eager``: HF transformers' own forward (any model, any device): generation through
  :class:`~tfb_core.generation.EagerDecoder`, scoring through
  :func:`~tfb_core.scoring.choice_probs`'s eager forward.
- ``static``: the hand-written Llama-family forward with a static KV cache and CUDA graphs:
  :class:`~tfb_core.cuda_decode.StaticDecoder` and
  :class:`~tfb_core.cuda_prefill.PrefillEngine` (on a CPU they run the same forward eagerly).
- ``auto``: ``static`` for a supported model on CUDA, else ``eager``.

Both decoders are a :class:`~tfb_core.generation.Decoder`: callers hold that one type.
:class:`Engine` is what a server holds: a posterior and its engine kind, with a verb for each
kind of work (score choices, score prompts, a decoder for generation).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .cuda_decode import StaticDecoder
from .cuda_llama import is_supported, require_supported
from .encoding import Encoded
from .generation import Decoder, EagerDecoder, TokenInfo
from .uncertainty import Uncertainty, decompose

ENGINES = ("auto", "static", "eager")


def resolve_engine(post, engine: str = "auto") -> str:
    """``"static"`` or ``"eager"``: ``auto`` is static for a supported model (the Llama family)
    on CUDA; ``static`` raises a ValueError naming the model type for an unsupported model."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        on_cuda = next(post.model.parameters()).device.type == "cuda"
        return "static" if is_supported(post.model) and on_cuda else "eager"
    if engine == "static":
        require_supported(post.model)
    return engine


def make_decoder(post, engine: str = "auto", **options) -> Decoder:
    """An empty decoder of the engine :func:`resolve_engine` picks.

    Parameters
    ----------
    engine : {"auto", "static", "eager"}, default="auto"
    **options
        :class:`~tfb_core.cuda_decode.StaticDecoder`'s (``graph``, ``bucket``, ``compile``,
        ``prefill``); ignored by the eager engine.
    """
    if resolve_engine(post, engine) == "static":
        return StaticDecoder(post, **options)
    return EagerDecoder(post)


def make_prefill(post, engine: str = "auto", **options):
    """The scoring engine for :func:`~tfb_core.scoring.choice_probs` (its ``engine``): a
    :class:`~tfb_core.cuda_prefill.PrefillEngine` for ``static``, None (HF's eager forward) else."""
    if resolve_engine(post, engine) != "static":
        return None
    from .cuda_prefill import PrefillEngine

    return PrefillEngine(post, **options)


class Engine:
    """A posterior and the kernels that run it: every forward a server needs.

    >>> engine = Engine(post)                       # static on CUDA for the Llama family, else eager
    >>> probs = engine.score([encode_item(tok, item)], [(0, 10)])[0]   # (K, C)
    >>> u = engine.uncertainty(probs)               # the tempered average, PE, EE, MI
    >>> decoder = engine.decoder()                  # generation: admit, step, filter

    Parameters
    ----------
    post : Posterior
    kind : {"auto", "static", "eager"}, default="auto"
        The engine kind (:func:`resolve_engine`); a ValueError names the model type when
        ``static`` cannot run it.
    """

    def __init__(self, post, kind: str = "auto"):
        self.post = post
        self.kind = resolve_engine(post, kind)  # "static" or "eager"
        # scoring forwards: fused kernels, CUDA graphs on CUDA (None: HF's eager forward)
        self.prefill = make_prefill(post, self.kind)

    def score(self, encoded: Sequence[Encoded], samples: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Per item, its (K_i, C_i) per-sample choice probabilities, all items in one batched
        pass (:func:`~tfb_core.scoring.choice_probs`); ``samples``: per item (seed, K)."""
        from .scoring import choice_probs

        return choice_probs(self.post, encoded, samples, engine=self.prefill)

    def score_prompts(self, prompts: Sequence[list[int]], samples: Sequence[tuple[int, int]],
                      top_logprobs: int = 0) -> list[list[TokenInfo]]:
        """Each prompt's tokens scored under the model average and each weight sample
        (:func:`~tfb_core.scoring.score_prompts`)."""
        from .scoring import score_prompts

        return score_prompts(self.post, prompts, samples, top_logprobs, engine=self.prefill)

    def uncertainty(self, sample_probs: torch.Tensor) -> Uncertainty:
        """One item's (K, C) per-sample probabilities as the posterior serves them: the average
        tempered by its temperature, PE, EE and MI (fields of shape (1, C) and (1,))."""
        return decompose(sample_probs[None].double(), float(self.post.config.temperature or 1.0))

    def decoder(self) -> Decoder:
        """A new, empty decoder of this kind; on CUDA it prefills through the scoring engine's graphs."""
        return make_decoder(self.post, self.kind, prefill=self.prefill)
