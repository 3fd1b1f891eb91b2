"""Which engine runs a posterior, picked from the model and its device.

- ``eager``: HF transformers' own forward (any model, any device): generation through
  :class:`~tfb_core.generation.EagerDecoder`, scoring through
  :func:`~tfb_core.scoring.choice_probs`'s eager forward.
- ``static``: the hand-written Llama-family forward with a static KV cache and CUDA graphs:
  :class:`~tfb_core.cuda_decode.StaticDecoder` and
  :class:`~tfb_core.cuda_prefill.PrefillEngine` (on a CPU they run the same forward eagerly).
- ``auto``: ``static`` for a supported model on CUDA, else ``eager``.

Both decoders are a :class:`~tfb_core.generation.Decoder`: callers hold that one type.
"""

from __future__ import annotations

from .cuda_decode import StaticDecoder
from .cuda_llama import is_supported, require_supported
from .generation import Decoder, EagerDecoder

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
