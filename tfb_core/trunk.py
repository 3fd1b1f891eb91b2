"""The trunk the weight samples share, with HF modules: with the noise in the last L decoder
layers only, the eager engines (the prompt-sharing scorer, the eager decoder) run the layers
below N - L once per distinct row and fan out to the weight samples' rows at layer N - L."""

from __future__ import annotations

import torch

from .models import cache_kwarg


def trunk_split(post) -> int:
    """N - L, where the eager engines (the prompt-sharing scorer,
    :class:`~tfb_core.generation.DecodeBatch`) fan out to the weight samples' rows; 0 when they
    run every row through every layer (every layer stochastic, or a model without the Llama family's layout of
    HF modules: ``model.model`` with ``embed_tokens``, ``rotary_emb``, ``layers`` and ``norm``)."""
    inner = getattr(post.model, "model", None)
    layout = all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm"))
    return post.first_stochastic_layer if layout else 0


def new_cache(model):
    """An empty DynamicCache for ``model`` (one layer per decoder layer)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def trunk_forward(model, ids: torch.Tensor, key_mask: torch.Tensor, split: int, index: torch.Tensor, cache,
                  keep: int = 1) -> tuple[torch.Tensor, object]:
    """The model's HF modules one decoder layer at a time, with the trunk shared.

    ``ids`` (B, T): the trunk's rows, one per distinct token row; ``key_mask`` (B, S): the real
    columns of the cache's keys followed by those of ``ids`` (S = cached + T). Layers below
    ``split`` run on the B rows; at ``split`` every row r of the result continues as row
    ``index[r]``'s copy (the stream, RoPE's cos and sin, the mask), and the layers above run on
    those R rows, each with its own weight sample. ``cache`` (a DynamicCache) gets each layer's
    keys and values (B rows below ``split``, R above). Returns the logits of the last ``keep``
    positions (R, keep, V) and the cache.
    """
    inner = model.model
    B, T = ids.shape
    S = key_mask.shape[1]
    x = inner.embed_tokens(ids)  # (B, T, d)
    pos = (key_mask.cumsum(-1) - 1).clamp_min(0)[:, S - T:]
    cos, sin = inner.rotary_emb(x, pos)  # (B, T, hd)
    attn = attention_mask(key_mask, T, x.dtype)  # (B, 1, T, S)
    kw = cache_kwarg(inner.layers[0])
    for i, layer in enumerate(inner.layers):
        if i == split:
            x, cos, sin, attn = x[index], cos[index], sin[index], attn[index]
        out = layer(x, attention_mask=attn, position_embeddings=(cos, sin), use_cache=True, **{kw: cache})
        x = out[0] if isinstance(out, tuple) else out
    return model.lm_head(inner.norm(x[:, T - keep:])), cache


def attention_mask(key_mask: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (R, 1, T, S) mask: the T queries are the last T of the S columns; each sees the
    real columns up to its own (a padding query sees itself only, never a row of -inf)."""
    R, S = key_mask.shape
    q = torch.arange(S - T, S, device=key_mask.device)[:, None]
    k = torch.arange(S, device=key_mask.device)[None]
    allowed = ((k <= q)[None] & key_mask[:, None, :].bool()) | (k == q)[None]  # (R, T, S)
    out = torch.zeros(R, 1, T, S, dtype=dtype, device=key_mask.device)
    return out.masked_fill_(~allowed[:, None], float("-inf"))
