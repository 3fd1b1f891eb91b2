"""Scoring forwards on CUDA with few kernels, replayed from CUDA graphs where launches dominate.

:func:`tfb_core.scoring.choice_probs` runs HF transformers eagerly: a short prompt x K samples
(B = 1, T = 128, K = 10 on an 8B model) is bound by kernel launches, and every RMSNorm costs
six elementwise passes. :class:`PrefillEngine` runs the same forward for the Llama family

- the hand-written forward of :mod:`tfb_core.cuda_llama` (as
  :class:`~tfb_core.cuda_decode.StaticDecoder`'s step: the model's own modules for every
  projection and the MLP, so the TFB layers run as in the engine; one fused ``rms_norm``; RoPE
  on q and k together), its attention SDPA with the causal + left-padding mask;
- each row's weight sample ``E_k`` read from fixed buffers through a row -> slot map
  (least recently used samples make room);
- captured in a CUDA graph per shape (rows, tokens rounded up to ``bucket``, kept positions)
  the second time a shape up to ``graph_tokens`` padded tokens comes, at most ``max_graphs``
  of them (LRU), and replayed; one-off and larger (compute-bound) shapes run the same code
  eagerly.

On a CPU, or for other model types, :func:`~tfb_core.scoring.choice_probs` keeps its eager HF
forward. The buffers take the posterior's ``sigma`` when created: make a new engine after
changing it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch

from .cuda_llama import (Graphed, GraphSet, assign_slots, attend_prompt, attention_shape, embed, head, layers,
                         noise_buffers, on_device, pow2, prompt_mask, require_supported, row_noise)
from .scoring import left_pad


class PrefillEngine(Graphed):
    """Last-positions logits of left-padded rows under per-row weight samples.

    Parameters
    ----------
    graph : bool, default=None
        Capture CUDA graphs; ``None`` means on CUDA devices.
    graph_tokens : int
        Shapes up to this many padded tokens (rows x bucketed length) are graphed, from the
        second forward of that shape on (a shape seen once runs eagerly: no capture cost).
    max_graphs, graph_bytes : int
        Captured graphs kept, and the bytes their output logits may hold together (least
        recently used dropped first; a shape whose logits alone exceed 1/8 of it is not graphed).
    bucket : int
        Lengths are rounded up to a multiple of this for a graph (padding on the left).
    """

    def __init__(self, post, graph: bool | None = None, graph_tokens: int = 8192, max_graphs: int = 32,
                 graph_bytes: int = 2 << 30, bucket: int = 32):
        model = post.model
        require_supported(model)
        self.post = post
        self.heads, self.kv_heads, self.head_dim = attention_shape(model.config)
        self.device = next(model.parameters()).device
        self.sigma = post.sigma
        self.use_graph = (self.device.type == "cuda") if graph is None else graph
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs} (graph=False turns graphs off)")
        self.graph_tokens, self.max_graphs, self.graph_bytes = graph_tokens, max_graphs, graph_bytes
        self.bucket = bucket
        self.logit_bytes = model.config.vocab_size * next(model.parameters()).element_size()  # per row, position
        self._graphs = GraphSet()  # (rows, T, keep) -> (graph, inputs, logits), LRU
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # forwards per shape (bounded)
        self.noise: list[torch.Tensor] = []  # per TFB layer: (slots, r, n) = E_k
        self.slot_of: OrderedDict[tuple[int, int], int] = OrderedDict()  # (seed, k) -> slot, LRU

    @torch.no_grad()
    def logits(self, rows: Sequence[list[int]], keep: int, samples: Sequence[tuple[int, int]],
               slot_ids: Sequence[int]) -> torch.Tensor:
        """Logits of the last ``keep`` positions, (len(rows), keep, V); row i runs weight sample
        ``samples[slot_ids[i]]`` (a (seed, k) pair)."""
        n, T = len(rows), max(len(r) for r in rows)
        graphed = self.use_graph and self.capture_error is None
        if graphed:
            T = self.bucket * math.ceil(T / self.bucket)
            graphed = self.wants_graph(n, T, keep)
        slot = self._slots(samples)
        ids, mask, pos = left_pad(rows, T)
        inputs = {"ids": ids, "mask": mask, "pos": pos,
                  "slots": torch.tensor([slot[samples[s]] for s in slot_ids], dtype=torch.long)}
        with on_device(self.device):
            if graphed:
                out = self._replay(inputs, keep)
                if out is not None:
                    return out
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with row_noise(self.post, self.noise, inputs["slots"]):
                return self._forward(inputs, keep)

    # --- the forward -----------------------------------------------------------------------

    def _forward(self, inputs: dict, keep: int) -> torch.Tensor:
        model = self.post.model
        ids, mask, pos = inputs["ids"], inputs["mask"], inputs["pos"]
        T = ids.shape[1]
        x, cos, sin = embed(model, ids, pos)  # (R, T, d), (R, 1, T, hd)
        attn_mask = prompt_mask(mask, x.dtype)
        return head(model, layers(model, x, cos, sin,
                                  lambda i, q, k, v: attend_prompt(q, k, v, attn_mask))[:, T - keep:])

    # --- graphs ----------------------------------------------------------------------------

    def wants_graph(self, rows: int, length: int, keep: int) -> bool:
        """Whether this (padded) shape runs from a graph: small enough, and seen before."""
        key = (rows, length, keep)
        if key in self.graphs:
            return True
        if rows * length > self.graph_tokens or rows * keep * self.logit_bytes > self.graph_bytes // 8:
            return False
        self.seen[key] = self.seen.pop(key, 0) + 1
        while len(self.seen) > 1024:
            self.seen.popitem(last=False)
        return self.seen[key] >= 2

    def _replay(self, inputs: dict, keep: int) -> torch.Tensor | None:
        key = (*inputs["ids"].shape, keep)
        if key not in self.graphs:
            self._capture(key, inputs, keep)
            if key not in self.graphs:  # refused, out of memory, or over the byte budget
                return None
        self.graphs.move_to_end(key)
        graph, static, logits = self.graphs[key]
        for name, value in inputs.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        return logits

    def _capture(self, key: tuple, inputs: dict, keep: int) -> None:
        static = {k: v.to(self.device) for k, v in inputs.items()}
        with row_noise(self.post, self.noise, static["slots"]):
            captured = self._graphs.capture(lambda: self._forward(static, keep))
        if captured is None:  # out of memory (this forward runs eagerly) or refused (every shape does)
            return
        graph, logits = captured
        self.graphs[key] = (graph, static, logits)
        while len(self.graphs) > self.max_graphs or \
                sum(out.numel() * out.element_size() for _, _, out in self.graphs.values()) > self.graph_bytes:
            self.graphs.popitem(last=False)

    # --- weight samples --------------------------------------------------------------------

    def _slots(self, samples: Sequence[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """A slot holding ``E_k`` for every sample of this forward (least recently used
        samples make room; the buffers grow, dropping the graphs, when this forward needs more)."""
        wanted = [(int(a), int(b)) for a, b in samples]
        cap = self.noise[0].shape[0] if self.noise else 0
        if self.sigma > 0 and len(wanted) > cap:
            cap = max(16, pow2(len(wanted)))
            self.noise = noise_buffers(self.post, cap, self.device)
            self.slot_of.clear()
            self._graphs.drop()  # captured on the old buffers
        elif self.sigma == 0:
            cap = max(cap, len(wanted))
        assign_slots(self.post, self.noise, self.slot_of, wanted, cap, self.sigma)
        return dict(self.slot_of)
