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

from .cuda_llama import (Graphed, GraphSet, assign_slots, attend_prompt, attention_shape, embed, graph_rows, head, layers,
                         noise_buffers, on_device, pow2, prompt_mask, require_supported, row_noise)
from .scoring import distinct_rows, left_pad


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
    share_trunk : bool, default=True
        With a posterior whose noise is in the last L layers only (``stochastic_layers``), run
        layers 0..N-L-1 once per distinct row (the weight samples of one sequence share them)
        and fan out to every row at layer N - L (:func:`~tfb_core.cuda_llama.layers`). Same
        logits up to rounding; False runs every row through every layer.
    """

    def __init__(self, post, graph: bool | None = None, graph_tokens: int = 8192, max_graphs: int = 32,
                 graph_bytes: int = 2 << 30, bucket: int = 32, share_trunk: bool = True):
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
        self.share_trunk = share_trunk
        size = next(model.parameters()).element_size()
        self.logit_bytes = model.config.vocab_size * size  # per row, position
        self.kv_bytes = 2 * model.config.num_hidden_layers * self.kv_heads * self.head_dim * size  # per row, token
        self._graphs = GraphSet()  # (rows, T, keep, trunk rows, kv) -> (graph, inputs, outputs), LRU
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # forwards per shape (bounded)
        self.noise: list[torch.Tensor] = []  # per TFB layer: (slots, r, n) = E_k
        self.slot_of: OrderedDict[tuple[int, int], int] = OrderedDict()  # (seed, k) -> slot, LRU

    @torch.no_grad()
    def logits(self, rows: Sequence[list[int]], keep: int, samples: Sequence[tuple[int, int]],
               slot_ids: Sequence[int]) -> torch.Tensor:
        """Logits of the last ``keep`` positions, (len(rows), keep, V); row i runs weight sample
        ``samples[slot_ids[i]]`` (a (seed, k) pair)."""
        return self._run(rows, keep, samples, slot_ids, kv=False)[0]

    @torch.no_grad()
    def prompts(self, rows: Sequence[list[int]], samples: Sequence[tuple[int, int]], slot_ids: Sequence[int]
                ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """For generation: the last position's logits (R, V, float32), every layer's keys (after
        RoPE) and values (R, KVH, T, hd), the padding mask (R, T; CPU) of the left-padded rows
        (T: the longest row, rounded up to ``bucket`` when graphs are on), and the trunk's index
        (R,; CPU) or None. Keys and values may be a graph's outputs, overwritten by the next
        call: copy them before. With a shared trunk (an index) the layers below N - L ran once
        per distinct row: their keys and values are (B, KVH, T, hd), row i's at ``index[i]``."""
        n, T = len(rows), self.padded_length(max(len(r) for r in rows))
        if self._graphs_on and self._fits(graph_rows(n), T, 1, kv=True):
            # rows rounded up (copies of the first: graph_rows), so admissions of any size
            # share a few graphed shapes
            rows = list(rows) + [rows[0]] * (graph_rows(n) - n)
            slot_ids = list(slot_ids) + [slot_ids[0]] * (graph_rows(n) - n)
        (logits, kv), mask, index = self._run(rows, 1, samples, slot_ids, kv=True)
        return (logits[:n, -1].float(), [t[:n] for t in kv[0::2]], [t[:n] for t in kv[1::2]], mask[:n],
                None if index is None else index[:n])

    def padded_length(self, length: int) -> int:
        """The length rows of ``length`` tokens are padded to: rounded up to ``bucket`` while
        graphs are on, else as it is."""
        return self.bucket * math.ceil(length / self.bucket) if self._graphs_on else length

    @property
    def _graphs_on(self) -> bool:
        return self.use_graph and self.capture_error is None

    def _run(self, rows, keep, samples, slot_ids, kv: bool) -> tuple:
        """(the forward's output, the rows' mask, the trunk's index or None)."""
        n, T = len(rows), self.padded_length(max(len(r) for r in rows))
        trunk, index = self._trunk(rows)
        graphed = self._graphs_on and self.wants_graph(n, T, keep, kv, len(trunk) if index is not None else 0)
        slot = self._slots(samples)
        ids, mask, pos = left_pad(trunk, T)
        inputs = {"ids": ids, "mask": mask, "pos": pos,
                  "slots": torch.tensor([slot[samples[s]] for s in slot_ids], dtype=torch.long)}
        if index is not None:
            inputs["index"] = index
            mask = mask[index]
        with on_device(self.device):
            if graphed:
                out = self._replay(inputs, keep, kv)
                if out is not None:
                    return out, mask, index
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with row_noise(self.post, self.noise, inputs["slots"]):
                return self._forward(inputs, keep, kv), mask, index

    def _trunk(self, rows) -> tuple[list, torch.Tensor | None]:
        """(the distinct rows, row -> distinct row) when the trunk is shared, else (rows, None).
        Rows of equal tokens differ only in their weight sample, so below layer N - L they
        compute the same."""
        if not self.share_trunk or self.post.first_stochastic_layer == 0:
            return rows, None
        trunk, index = distinct_rows(rows)
        return (rows, None) if len(trunk) == len(rows) else (trunk, index)

    # --- the forward -----------------------------------------------------------------------

    def _forward(self, inputs: dict, keep: int, kv: bool = False):
        """Logits of the last ``keep`` positions; with ``kv`` (logits, [k_0, v_0, k_1, v_1, ...]).
        With ``inputs["index"]`` the rows of ``ids`` are the trunk's (one per distinct row), fanned
        out to every row at layer N - L (the keys and values below it are the trunk rows')."""
        model = self.post.model
        ids, mask, pos = inputs["ids"], inputs["mask"], inputs["pos"]
        index = inputs.get("index")
        T = ids.shape[1]
        x, cos, sin = embed(model, ids, pos)  # (B, T, d), (B, 1, T, hd): B trunk rows
        trunk_mask = prompt_mask(mask, x.dtype)  # (B, 1, T, T)
        split, fan_out, attn_mask = 0, None, trunk_mask
        if index is not None:
            split = self.post.first_stochastic_layer
            fan_out, attn_mask = (split, index), trunk_mask[index]  # (R, 1, T, T) from layer `split` up
        cache: list[torch.Tensor] = []

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if kv:  # k may be a view of q and k together (RoPE's plain path): keep k alone
                cache.extend([k.contiguous(), v])
            return attend_prompt(q, k, v, trunk_mask if i < split else attn_mask)

        logits = head(model, layers(model, x, cos, sin, attend, fan_out)[:, T - keep:])
        return (logits, cache) if kv else logits

    # --- graphs ----------------------------------------------------------------------------

    def wants_graph(self, rows: int, length: int, keep: int, kv: bool = False, trunk: int = 0) -> bool:
        """Whether this (padded) shape runs from a graph: small enough, and seen before. ``trunk``:
        the rows of a shared trunk (0: none)."""
        key = (rows, length, keep, trunk, kv)
        if key in self.graphs:
            return True
        if not self._fits(rows, length, keep, kv):
            return False
        self.seen[key] = self.seen.pop(key, 0) + 1
        while len(self.seen) > 1024:
            self.seen.popitem(last=False)
        return self.seen[key] >= 2

    def _fits(self, rows: int, length: int, keep: int, kv: bool) -> bool:
        """Whether a shape is small enough to graph: padded tokens, and its outputs' bytes."""
        return (rows * length <= self.graph_tokens and rows * keep * self.logit_bytes <= self.graph_bytes // 8
                and not (kv and rows * length * self.kv_bytes > self.graph_bytes // 2))

    def _replay(self, inputs: dict, keep: int, kv: bool):
        index = inputs.get("index")
        trunk, T = inputs["ids"].shape
        key = (len(inputs["slots"]), T, keep, 0 if index is None else trunk, kv)
        if key not in self.graphs:
            self._capture(key, inputs, keep, kv)
            if key not in self.graphs:  # refused, out of memory, or over the byte budget
                return None
        self.graphs.move_to_end(key)
        graph, static, out = self.graphs[key]
        for name, value in inputs.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, key: tuple, inputs: dict, keep: int, kv: bool) -> None:
        static = {k: v.to(self.device) for k, v in inputs.items()}
        with row_noise(self.post, self.noise, static["slots"]):
            captured = self._graphs.capture(lambda: self._forward(static, keep, kv))
        if captured is None:  # out of memory (this forward runs eagerly) or refused (every shape does)
            return
        graph, out = captured
        self.graphs[key] = (graph, static, out)
        while len(self.graphs) > self.max_graphs or \
                sum(_nbytes(out) for _, _, out in self.graphs.values()) > self.graph_bytes:
            old, _ = self.graphs.popitem(last=False)
            self.seen.pop(old, None)  # graphed again only after two more sightings (no capture churn)

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


def _nbytes(out) -> int:
    """Bytes of a graph's outputs: logits, or (logits, keys and values)."""
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    logits, kv = out
    return _nbytes(logits) + sum(_nbytes(t) for t in kv)
