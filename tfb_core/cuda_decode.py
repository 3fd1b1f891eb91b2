"""The decode engine for CUDA: a static KV cache and the decode step's forward in CUDA graphs.

:class:`~tfb_core.generation.DecodeBatch` runs HF transformers eagerly with a growing
``DynamicCache``: on a GPU each step costs tens of milliseconds of kernel launches, whatever
K is. :class:`StaticDecoder` is the same continuous batch (``admit`` new sequences, ``step``,
``filter`` out the finished ones) with

- a static KV cache: one row per (sequence, weight sample), the active rows packed at the
  front, every row writing its next K/V at its own column (sequences join at any time);
- the step's forward written out for the Llama family (RMSNorm, RoPE, grouped-query
  attention, gated MLP), calling the model's own modules for every projection, so the TFB
  layers (base weight once for all rows + shared mean LoRA + rank-r noise per row) run
  exactly as in the eager engine; each row's weight sample ``E_k`` comes from a fixed noise
  buffer through a row -> sample map, so requests with different K and weight seeds share a step;
- on CUDA that forward captured once per row bucket (1, 2, 4, ... rows) in a CUDA graph and
  replayed: one launch per step instead of thousands; on CPU (or when capture is refused) the
  same forward runs eagerly;
- the model average, token choice and per-token PE / EE / MI done by the eager engine's
  :func:`~tfb_core.generation.choose_tokens` (one host sync per step) and committed by its
  :func:`~tfb_core.generation.apply`, so sampling, stops and ``top_logprobs`` behave exactly as
  in the eager engine.

With the noise in the last L layers only (``stochastic_layers``), the layers below N - L are
the same for every weight sample of a sequence: they keep one KV cache row per sequence (a
*trunk row*) and run once per sequence per step; at layer N - L the hidden state is gathered
into the sequence's K rows (a row -> trunk-row index buffer that stays put, so the graphs
capture it), and only the top L layers keep one KV cache row per weight sample.

New sequences are prefilled by the same hand-written forward straight into their cache rows
(:meth:`StaticDecoder.admit`: one forward of whole prompts, no copy). The noise buffers are
filled with the posterior's ``sigma`` when a weight sample first joins; create a new decoder
after changing ``sigma``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Sequence as Seq

import torch

from .cuda_llama import (Graphed, GraphSet, assign_slots, attend_decode, attend_prompt, attention_shape, embed,
                         graph_rows, head, layers, noise_buffers, on_device, pow2, prompt_mask, require_supported,
                         row_noise)
from .fused import write_kv
from .generation import (Choice, GenSequence, StepResult, apply, check_prompts, choose_tokens, kv_rows,
                         pad_token, split_finished)
from .rows import pad, positions, sample_map
from .errors import TFBError
from .models import max_context


# noise slots an idle decoder keeps whatever the next request needs (so K = 1 and K = 16 in
# turn keep one set of buffers and graphs): a step reads them all, 64 x r x n numbers per TFB
# layer, 4 MB a layer at r = 8 and the 8B shape in bf16, ~2% of the weights a step reads
KEPT_SLOTS = 64


class StaticDecoder(Graphed):
    """A continuous decode batch over a static KV cache, its step replayed from CUDA graphs: a
    :class:`~tfb_core.generation.Decoder` (:func:`tfb_core.engines.make_decoder` picks it).

    Rows ``[0, n)`` are the active sequences' rows, ``[seq 0: K_0 rows][seq 1: K_1
    rows]...`` as in :class:`~tfb_core.generation.DecodeBatch`; with a shared trunk, trunk rows
    ``[0, len(seqs))`` are the sequences' rows in the layers below N - L, one each. Buffers grow (and graphs are
    captured again) when an admit needs more rows, columns or weight samples than they hold, and
    are kept for later admits; an idle decoder drops them only when they exceed 4x what the
    next admit needs.

    Parameters
    ----------
    graph : bool, default=None
        Capture the step in CUDA graphs; ``None`` means on CUDA devices.
    bucket : int
        The cache length is rounded up to a multiple of this.
    compile : bool
        Compile the step's forward with ``torch.compile`` (fusing its elementwise kernels)
        before capturing it; a compile error falls back to the plain forward.
    prefill : PrefillEngine, optional
        :meth:`admit` runs new prompts through this engine (the scoring engine: the same
        forward, replayed from its CUDA graphs for shapes it has seen) and copies their keys and
        values in; without it, through the decoder's own eager forward.
    share_trunk : bool, default=True
        With a posterior whose noise is in the last L layers only (``stochastic_layers``), run
        layers 0..N-L-1 once per sequence over one KV cache row per sequence, and fan out to its
        K rows at layer N - L. Same tokens up to rounding; False keeps K rows in every layer.
    """

    def __init__(self, post, graph: bool | None = None, bucket: int = 64, compile: bool = False, prefill=None,
                 share_trunk: bool = True):
        model = post.model
        require_supported(model)
        self.post = post
        self.prefill = prefill  # a PrefillEngine for admit's forward (graphed), else the decoder's own
        self.bucket = bucket
        self.heads, self.kv_heads, self.head_dim = attention_shape(model.config)
        self.scaling = self.head_dim ** -0.5
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.sigma = post.sigma
        self.limit = max_context(model)
        head_layer = model.get_output_embeddings()  # an adapted LM head wraps the model's
        self.vocab = getattr(head_layer, "base_layer", head_layer).weight.shape[0]
        self.use_graph = (self.device.type == "cuda") if graph is None else graph
        self.seqs: list[GenSequence] = []
        self.ends: list[int] = []  # per sequence: the cache columns its rows need
        self.n = 0  # active rows
        self._kv_rows = 0  # the KV rows the active sequences hold (kv_rows)
        self.split = post.first_stochastic_layer if share_trunk else 0  # layers below it: trunk rows
        self.rows_cap = self.trunk_cap = self.length = self.samples_cap = 0
        self.slot_of: OrderedDict[tuple[int, int], int] = OrderedDict()  # (weight seed, k) -> noise slot
        self._graphs = GraphSet()  # (rows, trunk rows) -> (graph, logits)
        self.compile_error: str | None = None
        self._step_fn = torch.compile(self._forward, dynamic=False) if compile else None

    @property
    def kv_rows(self) -> int:
        """KV cache rows held, in rows of every layer (the server's KV budget): the sum of each
        sequence's :func:`~tfb_core.generation.kv_rows`, its K or fewer with a shared trunk."""
        return self._kv_rows

    @property
    def kv_layer_rows(self) -> int:
        """KV cache rows held summed over the layers: ``len(seqs)`` in each of the trunk's layers
        plus ``n`` (the sum of K) in each layer above (``n`` x N without a shared trunk)."""
        return self.split * len(self.seqs) + (len(self.post.model.model.layers) - self.split) * self.n

    # --- membership ------------------------------------------------------------------------

    @torch.no_grad()
    def admit(self, seqs: list[GenSequence]) -> StepResult:
        """Prefill new sequences straight into the static cache and join them: their prompts (K
        rows each) in one forward of the hand-written Llama code, each row's keys and values
        written into its own cache row, every sequence's first token chosen and committed. A
        sequence that finished at its first token holds its rows until the next :meth:`filter`
        returns it. All or nothing: if it raises, the active rows and ``seqs`` are as they were."""
        t0 = time.perf_counter()
        if self.post.sigma != self.sigma:  # its noise buffers hold the old sigma's draws
            raise TFBError(f"the posterior's sigma changed from {self.sigma:g} to {self.post.sigma:g} since this "
                           f"decoder was made; make a new one (tfb_core.make_decoder)")
        check_prompts(self.post, seqs)
        rows = [s.prompt_ids for s in seqs for _ in range(s.params.num_samples)]
        m, T = len(rows), max(len(r) for r in rows)
        if self.prefill is not None:
            T = self.prefill.padded_length(T)
        ends = self._make_room(seqs, m, T)
        r = slice(self.n, self.n + m)
        t = slice(len(self.seqs), len(self.seqs) + len(seqs))
        try:
            self._set_slots(r, seqs)
            self._set_trunks(r, t, seqs)
            with on_device(self.device):
                logits, mask = self._prefill(r, t, rows, seqs)
            mask = mask.to(self.device)
            tokens, choices = choose_tokens(self.post, seqs, logits)
            self._set_rows(r, mask, mask.sum(-1), tokens)
        except BaseException:  # the rows past the active ones stay harmless
            self._clear_cache(r, t)
            self._reset_rows(self.n, self.rows_cap)
            self._reset_trunks(len(self.seqs), self.trunk_cap)
            raise
        self._add(seqs, ends)
        return self._commit(StepResult(list(seqs), choices), t0)

    def _make_room(self, seqs: list[GenSequence], m: int, T: int) -> list[int]:
        """Buffers and noise slots for ``m`` new rows of ``seqs`` with prompts of ``T`` columns
        (shrunk first when idle, then grown); returns each sequence's last cache column."""
        ends = [T + self._steps_left(s) for s in seqs]
        keys = {(s.params.weight_seed, k) for s in self.seqs + seqs for k in range(s.params.num_samples)}
        if not self.n:  # idle: give back what one earlier long or wide request made it grow to
            self._shrink(m, max(ends), len(keys))
        self._reserve(self.n + m, len(self.seqs) + len(seqs), max(self.ends + ends), len(keys))
        self._assign_samples(seqs)
        return ends

    def _set_slots(self, r: slice, seqs: list[GenSequence]) -> None:
        self.slots[r] = torch.tensor([self.slot_of[(s.params.weight_seed, k)] for s in seqs
                                      for k in range(s.params.num_samples)], device=self.device)

    def _set_trunks(self, r: slice, t: slice, seqs: Seq[GenSequence]) -> None:
        """Rows ``r`` of ``seqs`` (K each) and their trunk rows ``t`` (one each): each row's trunk
        row, each trunk row's first row (whose token, position and mask the trunk reads)."""
        Ks = torch.tensor([s.params.num_samples for s in seqs], device=self.device)
        self.trunk_of[r] = torch.arange(t.start, t.stop, device=self.device).repeat_interleave(Ks)
        self.first_of[t] = r.start + Ks.cumsum(0) - Ks

    def _set_rows(self, r: slice, mask: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> None:
        """New rows ``r`` after their prompt (``mask``: its real columns): the next position,
        column and token of each."""
        T = mask.shape[1]
        self.bias[r] = float("-inf")
        self.bias[r, :T].masked_fill_(mask.bool(), 0.0)
        self.col[r] = T
        self.pos[r] = pos
        self.tok[r] = tok

    def _add(self, seqs: list[GenSequence], ends: list[int]) -> None:
        self.seqs += seqs
        self.ends += ends
        self.n += sum(s.params.num_samples for s in seqs)
        self._kv_rows += self._held(seqs)

    def _held(self, seqs: Seq[GenSequence]) -> int:
        """The KV rows ``seqs`` hold (:attr:`kv_rows`' unit); kept as a count, not summed per step."""
        N = len(self.post.model.model.layers)
        return sum(kv_rows(s.params.num_samples, N, self.split) for s in seqs)

    def _prefill(self, r: slice, t: slice, rows: list[list[int]],
                 seqs: list[GenSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt ``rows`` through the model into cache rows ``r`` and trunk rows ``t`` (their
        keys and values at columns ``[0, T)``, left-padded): the last position's logits (rows, V)
        and the mask (rows, T)."""
        if self.prefill is not None:  # the scoring engine's forward (graphed), then a copy
            samples, slot_ids = sample_map([(s.params.weight_seed, s.params.num_samples) for s in seqs])
            logits, keys, values, mask, index = self.prefill.prompts(rows, samples, slot_ids)
            T = mask.shape[1]
            Ks = torch.tensor([s.params.num_samples for s in seqs])
            firsts = Ks.cumsum(0) - Ks  # each sequence's first row among ``rows`` (on the host: no wait)
            for i, (k, v) in enumerate(zip(keys, values)):
                dst = t if i < self.split else r
                src = firsts if i < self.split else torch.arange(len(rows))
                if index is not None and i < self.post.first_stochastic_layer:  # the engine's trunk rows
                    src = index[src]
                if len(src) != len(k) or not torch.equal(src, torch.arange(len(k))):
                    src = src.to(k.device)
                    k, v = k[src], v[src]
                self.kc[i][dst, :, :T] = k
                self.vc[i][dst, :, :T] = v
            return logits, mask
        model = self.post.model
        trunk = [rows[f] for f in (self.first_of[t] - r.start).tolist()] if self.split else rows
        ids, mask = pad(trunk, length=max(len(row) for row in rows), value=pad_token(self.post.tokenizer))
        ids, dmask = ids.to(self.device), mask.to(self.device)
        T = ids.shape[1]
        x, cos, sin = embed(model, ids, positions(dmask))
        trunk_mask = prompt_mask(dmask, x.dtype)  # (B, 1, T, T): B sequences, or rows without a trunk
        fan_out, attn_mask = None, trunk_mask
        if self.split:
            index = self.trunk_of[r] - t.start  # (rows,) row -> its sequence
            fan_out, attn_mask, mask = (self.split, index), trunk_mask[index], mask[index.cpu()]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            dst = t if i < self.split else r
            self.kc[i][dst, :, :T] = k
            self.vc[i][dst, :, :T] = v
            return attend_prompt(q, k, v, trunk_mask if i < self.split else attn_mask)

        with row_noise(self.post, self.noise, self.slots[r]):
            return head(model, layers(model, x, cos, sin, attend, fan_out)[:, -1:]).float()[:, -1], mask

    def filter(self) -> list[GenSequence]:
        """Drop finished sequences and pack the remaining rows at the front; returns the dropped."""
        kept, done, keep = split_finished(self.seqs)
        ends = [end for s, end in zip(self.seqs, self.ends) if not s.finished]
        if len(kept) == len(self.seqs):
            return done
        trunks = [j for j, s in enumerate(self.seqs) if not s.finished]
        with torch.no_grad():
            self._pack(keep, self.kc[self.split:] + self.vc[self.split:] + [self.bias, self.col, self.pos, self.tok,
                                                                              self.slots])
            self._pack(trunks, self.kc[:self.split] + self.vc[:self.split])
        if any(s.finish_reason == "error" for s in done):  # its rows may hold NaN keys and values
            self._clear_cache(slice(len(keep), self.n), slice(len(kept), len(self.seqs)))
        self._reset_rows(len(keep), self.n)
        self._reset_trunks(len(kept), len(self.seqs))
        if kept:
            self._set_trunks(slice(0, len(keep)), slice(0, len(kept)), kept)
        self.seqs, self.ends, self.n = kept, ends, len(keep)
        self._kv_rows = self._held(kept)
        return done

    def _pack(self, keep: list[int], buffers: list[torch.Tensor]) -> None:
        """Rows ``keep`` of every buffer moved to the front, in order (rows already there stay)."""
        first = next((j for j, r in enumerate(keep) if r != j), len(keep))  # rows before it stay
        if first < len(keep):
            idx = torch.tensor(keep[first:], device=self.device)
            dst = slice(first, len(keep))
            for buf in buffers:
                buf[dst] = buf.index_select(0, idx)

    def _steps_left(self, s: GenSequence) -> int:
        steps = s.params.max_tokens - len(s.tokens)
        if self.limit is not None:
            steps = min(steps, self.limit - len(s.prompt_ids) - len(s.tokens))
        return max(steps, 0)

    # --- one step --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> StepResult:
        """Feed every row's last token, choose the next token of every sequence, and commit the
        choice (:func:`~tfb_core.generation.apply`).

        All or nothing: if it raises, the rows are as they were before and no sequence was
        touched, ready for :meth:`step_each`.
        """
        t0 = time.perf_counter()
        choices = []
        if self.n:
            rows = min(graph_rows(self.n), self.rows_cap)
            trunks = min(graph_rows(len(self.seqs)), self.trunk_cap) if self.split else 0
            saved = self._save_rows(0, rows)
            try:
                with on_device(self.device):  # graphs replay on the current device's stream
                    logits = self._run(rows, trunks)[:self.n]
                tokens, choices = choose_tokens(self.post, self.seqs, logits)
                self.tok[:self.n] = tokens
            except BaseException:
                self._restore_rows(0, saved)
                raise
        return self._commit(StepResult(list(self.seqs), choices), t0)

    @torch.no_grad()
    def step_each(self) -> StepResult:
        """:meth:`step`, one sequence at a time (eagerly, on its own rows): after a failed step,
        so only a sequence whose own step fails ends (``finish_reason`` "error", its exception in
        ``failure``); the others get the token they get alone."""
        t0 = time.perf_counter()
        choices, row = [], 0
        for j, s in enumerate(self.seqs):
            K, start = s.params.num_samples, row
            row += K
            if s.finished:
                choices.append(Choice())
                continue
            saved = self._save_rows(start, K)
            try:
                with on_device(self.device), row_noise(self.post, self.noise, self.slots[start:start + K]):
                    logits = self._forward(K, start, 1 if self.split else 0, j)
                tokens, mine = choose_tokens(self.post, [s], logits)
                self.tok[start:start + K] = tokens
                choices += mine
            except Exception as e:  # this sequence alone; its rows are dropped at the next filter
                self._restore_rows(start, saved)
                choices.append(Choice(failure=e))
        return self._commit(StepResult(list(self.seqs), choices), t0)

    def _commit(self, result: StepResult, t0: float) -> StepResult:
        apply(self.post, result)
        result.seconds = time.perf_counter() - t0
        return result

    def _save_rows(self, start: int, rows: int) -> tuple:
        """What a step changes in rows ``start .. start + rows`` (besides K/V at columns no row
        attends to yet): positions, columns, tokens and the mask at each row's new column."""
        r = slice(start, start + rows)
        col = self.col[r].clone()
        return col, self.pos[r].clone(), self.tok[r].clone(), self.bias[r].gather(1, col[:, None])

    def _restore_rows(self, start: int, saved: tuple) -> None:
        col, pos, tok, bias = saved
        r = slice(start, start + len(col))
        self.col[r], self.pos[r], self.tok[r] = col, pos, tok
        self.bias[r] = self.bias[r].scatter(1, col[:, None], bias)

    def _run(self, rows: int, trunks: int) -> torch.Tensor:
        if self.use_graph and self.capture_error is None:
            key = (rows, trunks)
            if key not in self.graphs:
                self._capture(rows, trunks)
            if key in self.graphs:
                graph, logits = self.graphs[key]
                graph.replay()
                return logits
        with row_noise(self.post, self.noise, self.slots[:rows]):
            return self._call(rows, trunks)

    def _call(self, rows: int, trunks: int) -> torch.Tensor:
        if self._step_fn is not None:
            try:
                return self._step_fn(rows, 0, trunks)
            except Exception as e:  # the compiler refused: the plain forward from now on
                self.compile_error = f"{type(e).__name__}: {e}"
                self._step_fn = None
        return self._forward(rows, 0, trunks)

    def _forward(self, rows: int, start: int = 0, trunks: int = 0, trunk_start: int = 0) -> torch.Tensor:
        """One token for rows ``[start, start + rows)`` through the model: last-position logits (rows, V).

        With a shared trunk, layers below N - L run on trunk rows ``[trunk_start, trunk_start +
        trunks)`` (each reads its first row's token, position and mask) and their cache rows; at
        layer N - L each row takes its trunk row's hidden state (``trunk_of``).

        The model's own modules for every projection and the MLP; the rest in few kernels (each
        costs a few microseconds inside a graph, whatever its size): the norms, RoPE, the MLP's
        product and the K/V write each one kernel (:mod:`tfb_core.fused`), and
        :func:`~tfb_core.cuda_llama.attend_decode` reading only each row's live columns.
        """
        model = self.post.model
        r = slice(start, start + rows)
        tok, pos, col, bias = self.tok[r], self.pos[r], self.col[r], self.bias[r]
        bias.scatter_(1, col[:, None], 0.0)  # each row's new column is real
        t, fan_out = r, None
        in_tok, in_pos, tcol, tbias = tok, pos, col, bias
        if self.split:
            t = slice(trunk_start, trunk_start + trunks)
            first = self.first_of[t]  # (trunks,) rows: every row of a sequence has its token, position, mask
            in_tok, in_pos, tcol, tbias = self.tok[first], self.pos[first], self.col[first], self.bias[first]
            fan_out = (self.split, self.trunk_of[r] - trunk_start)  # (rows,) row -> its trunk row here
        x, cos, sin = embed(model, in_tok[:, None], in_pos[:, None])  # (B, 1, d), (B, 1, 1, hd): B trunk rows

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            below = i < self.split
            kc, vc = self.kc[i][t if below else r], self.vc[i][t if below else r]
            write_kv(k, v, kc, vc, tcol if below else col)
            # columns 0 .. col of each row
            return attend_decode(q, kc, vc, tbias if below else bias, tcol if below else col, self.scaling)

        logits = self.logits[r]  # one float32 buffer for every graph's output (not one per graph)
        logits.copy_(head(model, layers(model, x, cos, sin, attend, fan_out))[:, -1])
        pos.add_(1)
        col.add_(1).clamp_max_(self.length - 1)  # only rows past every sequence's end reach it
        return logits

    def _capture(self, rows: int, trunks: int) -> None:
        """Warm up on a side stream, capture one step, restore the state the warm-up moved.

        The warm-up also writes K/V at each row's next two columns: columns no row attends to
        yet, written again by the real step before they are unmasked. Out of memory while
        capturing is not the graph's fault: this step then runs eagerly, a later one captures.
        """
        state = [self.bias, self.col, self.pos]
        saved = [s[:rows].clone() for s in state]

        def reset() -> None:
            for s, v in zip(state, saved):
                s[:rows] = v

        with row_noise(self.post, self.noise, self.slots[:rows]):
            captured = self._graphs.capture(lambda: self._call(rows, trunks), reset)
        if captured is not None:
            self.graphs[rows, trunks] = captured
        reset()

    def _drop_graphs(self) -> None:
        """Forget every graph and their memory pool: a new capture gets a new pool
        (:class:`~tfb_core.cuda_llama.GraphSet`)."""
        self._graphs.drop()

    # --- buffers ---------------------------------------------------------------------------

    def _reserve(self, rows: int, trunks: int, length: int, samples: int) -> None:
        """Grow the buffers to hold ``rows`` rows and ``trunks`` trunk rows of ``length`` columns,
        and ``samples`` draws.

        All or nothing: the new buffers are allocated and filled before any replaces the old
        (an out-of-memory error leaves the running batch as it was).
        """
        length = self.bucket * math.ceil(max(length, 1) / self.bucket)
        if rows <= self.rows_cap and trunks <= self.trunk_cap and length <= self.length \
                and samples <= self.samples_cap:
            return
        # rows: exactly what is needed at first (K KV caches for one sequence, no more), then
        # doubling; the step's graph buckets (graph_rows) are capped at the capacity
        R = self.rows_cap if rows <= self.rows_cap else max(rows, 2 * self.rows_cap)
        B = self.trunk_cap if trunks <= self.trunk_cap else max(trunks, 2 * self.trunk_cap)
        L, S = max(length, self.length), max(pow2(samples), self.samples_cap)
        dev, n, m = self.device, self.n, len(self.seqs)
        N = len(self.post.model.model.layers)
        shapes = [(B if i < self.split else R, self.kv_heads, L, self.head_dim) for i in range(N)]
        new = {"kc": [torch.zeros(shape, device=dev, dtype=self.dtype) for shape in shapes],
               "vc": [torch.zeros(shape, device=dev, dtype=self.dtype) for shape in shapes],
               "bias": torch.full((R, L), float("-inf"), device=dev),
               "noise": noise_buffers(self.post, S, dev) if self.sigma > 0 else [],
               "logits": torch.empty(R, self.vocab, device=dev),  # a step's output, float32
               "first_of": torch.zeros(B, dtype=torch.long, device=dev)}
        new["bias"][:, 0] = 0.0  # rows past the active ones (see _reset_rows)
        for name in ("col", "pos", "tok", "slots", "trunk_of"):
            new[name] = torch.zeros(R, dtype=torch.long, device=dev)
        if self.rows_cap:  # copy the active rows and the noise in use
            for i, (dst, src) in enumerate(zip(new["kc"] + new["vc"], self.kc + self.vc)):
                active = m if i % N < self.split else n
                dst[:active, :, :self.length] = src[:active]
            new["bias"][:n, :self.length] = self.bias[:n]
            for name in ("col", "pos", "tok", "slots", "trunk_of"):
                new[name][:n] = getattr(self, name)[:n]
            new["first_of"][:m] = self.first_of[:m]
            for dst, src in zip(new["noise"], self.noise):
                dst[:self.samples_cap] = src
        self._drop_graphs()  # captured on the old buffers
        self.__dict__.update(new)
        self.rows_cap, self.trunk_cap, self.length, self.samples_cap = R, B, L, S

    def _shrink(self, rows: int, length: int, samples: int) -> None:
        """With no active rows: drop the buffers (and graphs) when their columns are over 4x what
        this join needs, so one long request does not set the attention width of every later
        step; or when they must grow in columns anyway and their rows are over 4x what it needs
        (a wide burst's rows are not reallocated at a new length). Rows alone do not shrink them:
        spare rows cost memory, not time (a step runs the active rows' bucket), and keeping them
        keeps the captured graphs across a load that rises and falls. Noise slots over 4x what
        it needs, and over ``KEPT_SLOTS``, drop them too: unlike rows, every step reads every
        slot (the noise term is one product over all of them), so a burst of many weight seeds
        would slow every later step."""
        length = self.bucket * math.ceil(max(length, 1) / self.bucket)
        if self.length > 4 * length or (length > self.length and self.rows_cap > 4 * rows) \
                or self.samples_cap > max(4 * pow2(samples), KEPT_SLOTS):
            self._drop_graphs()
            self.kc = self.vc = self.noise = []
            self.logits = None
            self.rows_cap = self.trunk_cap = self.length = self.samples_cap = 0
            self.slot_of = OrderedDict()

    def _reset_rows(self, start: int, stop: int) -> None:
        """Rows past the active ones: attend to column 0 only, write there (finite, never NaN)."""
        if start >= stop:
            return
        self.bias[start:stop] = float("-inf")
        self.bias[start:stop, 0] = 0.0
        for buf in (self.col, self.pos, self.tok, self.slots, self.trunk_of):
            buf[start:stop] = 0

    def _reset_trunks(self, start: int, stop: int) -> None:
        """Trunk rows past the active ones: read row 0 (a graph's padding trunk rows compute on
        it and write only into their own cache rows)."""
        if start < stop:
            self.first_of[start:stop] = 0

    @torch.no_grad()
    def _clear_cache(self, rows: slice, trunks: slice) -> None:
        """Zero the keys and values of ``rows`` and ``trunks`` (trunk rows): a later sequence
        prefilled there with a shorter prompt masks the columns past its own, but a masked NaN
        still makes NaN (0 x NaN in the attention's weighted sum). Only after a sequence failed:
        finite stale values are harmless."""
        for i, (kc, vc) in enumerate(zip(self.kc, self.vc)):
            r = trunks if i < self.split else rows
            kc[r].zero_()
            vc[r].zero_()

    def _assign_samples(self, seqs: Seq[GenSequence]) -> None:
        """Give every weight sample of ``seqs`` a noise buffer slot. A sample whose sequences
        left keeps its slot (and its noise) until a new sample needs the room, so the next
        request with the same weight seed writes no noise; samples of active sequences are
        never evicted."""
        used = [(s.params.weight_seed, k) for s in self.seqs for k in range(s.params.num_samples)]
        new = [(s.params.weight_seed, k) for s in seqs for k in range(s.params.num_samples)]
        assign_slots(self.post, self.noise, self.slot_of, list(dict.fromkeys(used + new)), self.samples_cap,
                     self.sigma)
