"""Fast greedy K-sample decoding: a static KV cache and the whole step in one CUDA graph.

:func:`tfb_core.generation.generate` runs HF transformers eagerly with a growing
``DynamicCache`` and reads every token back to the host (``.item()``): on a GPU each step
costs tens of milliseconds of kernel launches and syncs, whatever K is. This module runs the
same computation with

- a static KV cache, one row per (sequence, weight sample), columns bucketed to a multiple of
  ``bucket`` so the shapes of a step never change;
- the step written out for the Llama family (RMSNorm, RoPE, grouped-query attention, gated
  MLP), calling the model's own modules for every projection, so the TFB layers (base weight
  once for all rows + shared mean LoRA + rank-r noise per sample) run exactly as in the
  engine;
- the model average, the greedy token, its log-probability and the per-token PE / EE / MI
  computed on the device and written into device buffers, the chosen token fed to the next
  step on the device: no host synchronisation inside the step loop;
- on CUDA the step captured once in a CUDA graph and replayed; on CPU (or when capture is
  refused) the same step runs eagerly.

Scope: greedy decoding (temperature 0), every sequence with the same ``num_samples`` and
``weight_seed``, no ``top_logprobs``. :func:`generate_fast` falls back to
:func:`~tfb_core.generation.generate` for anything else, and for model types other than
``llama``. The prefill is the engine's own (:meth:`DecodeBatch.prefill`).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Sequence as Seq

import torch

from .generation import DecodeBatch, GenSequence, SamplingParams, TokenInfo, generate
from .scoring import max_context
from .uncertainty import entropy

SUPPORTED_MODEL_TYPES = ("llama",)


class Unsupported(ValueError):
    """The fast path cannot run this request; use :func:`tfb_core.generation.generate`."""


def check_supported(post, seqs: Seq[GenSequence]) -> None:
    model_type = getattr(post.model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise Unsupported(f"model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if not seqs:
        raise Unsupported("no sequences")
    keys = {(s.params.num_samples, s.params.weight_seed) for s in seqs}
    if len(keys) != 1:
        raise Unsupported("sequences with different num_samples or weight_seed")
    for s in seqs:
        if s.params.temperature != 0:
            raise Unsupported("sampling (temperature > 0): only greedy decoding is graphed")
        if s.params.top_logprobs:
            raise Unsupported("top_logprobs")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FastDecoder:
    """Greedy K-sample decoding of a batch of sequences with a static cache.

    ``FastDecoder(post, seqs)`` runs the prefill (the engine's) and chooses every sequence's
    first token; :meth:`step` decodes one more token for every row without a host sync;
    :meth:`collect` reads what was decoded back into the ``GenSequence`` objects (one sync).

    Parameters
    ----------
    graph : bool, default=None
        Capture the step in a CUDA graph; ``None`` means on CUDA devices.
    bucket : int
        The static cache length is rounded up to a multiple of this.
    """

    def __init__(self, post, seqs: list[GenSequence], graph: bool | None = None, bucket: int = 64):
        check_supported(post, seqs)
        self.post = post
        self.seqs = seqs
        model = post.model
        cfg = model.config
        self.K = seqs[0].params.num_samples
        self.seed = seqs[0].params.weight_seed
        self.B = len(seqs)
        self.rows = self.B * self.K
        self.n_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5

        with torch.no_grad():
            batch = DecodeBatch.prefill(post, seqs)  # the first token of every sequence
        self.device = batch._device
        T = batch.mask.shape[1]
        limit = max_context(model)
        longest = max(s.params.max_tokens for s in seqs)
        room = longest - 1
        if limit is not None:
            room = min(room, limit - min(len(s.prompt_ids) for s in seqs) - 1)
        self.max_new = max(room, 0)
        self.length = max(bucket * math.ceil((T + self.max_new) / bucket), T + 1)
        dev, dtype = self.device, next(model.parameters()).dtype
        shape = (self.rows, self.kv_heads, self.length, self.head_dim)
        self.kc, self.vc = [], []
        for layer in batch.cache.layers:
            k = torch.zeros(shape, device=dev, dtype=layer.keys.dtype)
            v = torch.zeros(shape, device=dev, dtype=layer.values.dtype)
            k[:, :, :T] = layer.keys
            v[:, :, :T] = layer.values
            self.kc.append(k)
            self.vc.append(v)
        del batch.cache
        # attention bias over the cache columns: 0 where a row has a real token, -inf elsewhere
        bias = torch.full((self.rows, self.length), float("-inf"), device=dev)
        bias[:, :T].masked_fill_(batch.mask.to(dev).bool(), 0.0)
        self.bias = bias[:, None, None, :]  # (rows, 1, 1, length)
        self.col = torch.tensor([T], device=dev)  # the column the next token's K/V go to
        self.pos = batch.positions.to(dev).clone()  # (rows,) position of the next token
        self.tok = batch.last.to(dev).clone()  # (rows,) the token to feed next
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # steps done (device side)
        n = max(self.max_new, 1)
        self.out_tok = torch.zeros(n, self.B, dtype=torch.long, device=dev)
        self.out_logp = torch.zeros(n, self.B, device=dev)
        self.out_pe = torch.zeros(n, self.B, device=dev)
        self.out_ee = torch.zeros(n, self.B, device=dev)
        self.done = 0  # steps run (host side)
        self.collected = 0  # steps read back into seqs
        self.use_graph = (dev.type == "cuda") if graph is None else graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graphed = False
        self.capture_error: str | None = None
        self._keep: list = []

    # --- the step ------------------------------------------------------------------------

    def room(self) -> int:
        """Steps that can still run (the static cache and the longest max_tokens)."""
        return self.max_new - self.done

    @torch.no_grad()
    def step(self) -> None:
        """Decode one token for every row. No host synchronisation."""
        if self.room() <= 0:
            raise RuntimeError("no room left: every sequence reached its max_tokens")
        if self.use_graph and self.graph is None and self.capture_error is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            with self.post.samples(num_samples=self.K, seed=self.seed):
                self._body()
        self.done += 1

    def _body(self) -> None:
        model = self.post.model
        inner = model.model
        rows, H, KVH, hd = self.rows, self.heads, self.kv_heads, self.head_dim
        G = H // KVH
        self.bias.index_fill_(-1, self.col, 0.0)  # the new column is real for every row
        x = inner.embed_tokens(self.tok[:, None])  # (rows, 1, d)
        cos, sin = inner.rotary_emb(x, self.pos[:, None])  # (rows, 1, hd)
        cos, sin = cos[:, None], sin[:, None]  # (rows, 1, 1, hd)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, 1, H, hd).transpose(1, 2)  # (rows, H, 1, hd)
            k = attn.k_proj(h).view(rows, 1, KVH, hd).transpose(1, 2)  # (rows, KVH, 1, hd)
            v = attn.v_proj(h).view(rows, 1, KVH, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.kc[i], self.vc[i]
            kc.index_copy_(2, self.col, k.to(kc.dtype))
            vc.index_copy_(2, self.col, v.to(vc.dtype))
            # grouped-query attention over the static cache, one query per row
            qg = q.reshape(rows, KVH, G, hd)
            scores = torch.matmul(qg, kc.transpose(-1, -2)).float() * self.scaling  # (rows, KVH, G, L)
            w = torch.softmax(scores + self.bias, -1).to(vc.dtype)
            o = torch.matmul(w, vc)  # (rows, KVH, G, hd)
            o = o.reshape(rows, 1, H * hd).to(x.dtype)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = inner.norm(x)
        logits = model.lm_head(x).float()[:, -1]  # (rows, V)
        self._choose(logits)

    def _choose(self, logits: torch.Tensor) -> None:
        """The model average of each sequence's K rows, its greedy token and uncertainty."""
        pk = torch.softmax(logits, -1).view(self.B, self.K, -1)  # (B, K, V)
        p = pk.mean(1)  # (B, V)
        token = p.argmax(-1)  # (B,)
        logp = torch.log(p.gather(1, token[:, None])[:, 0].clamp_min(1e-45))
        self.out_tok.index_copy_(0, self.t, token[None])
        self.out_logp.index_copy_(0, self.t, logp[None])
        self.out_pe.index_copy_(0, self.t, entropy(p)[None])
        self.out_ee.index_copy_(0, self.t, entropy(pk).mean(1)[None])
        self.tok.copy_(token.repeat_interleave(self.K))
        self.pos.add_(1)
        self.col.add_(1)
        self.t.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream, capture one step, restore the state the warm-up moved."""
        state = [self.bias, self.col, self.pos, self.tok, self.t]
        saved = [s.clone() for s in state]
        try:
            with self.post.samples(num_samples=self.K, seed=self.seed):
                # keep the noise tensors alive: the graph holds their addresses
                self._keep = [layer.noise for layer in self.post.layers]
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._body()
                torch.cuda.current_stream().wait_stream(stream)
                for s, v in zip(state, saved):
                    s.copy_(v)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._body()
            self.graph = graph
            self.graphed = True
        except Exception as e:  # e.g. an op that syncs: run eagerly instead
            self.capture_error = f"{type(e).__name__}: {e}"
            self.graph = None
            torch.cuda.synchronize()
        for s, v in zip(state, saved):
            s.copy_(v)

    # --- reading back ----------------------------------------------------------------------

    def collect(self) -> None:
        """Copy the tokens decoded since the last call into the sequences (one host sync)."""
        if self.collected >= self.done:
            return
        sl = slice(self.collected, self.done)
        toks = self.out_tok[sl].cpu().tolist()
        logps = self.out_logp[sl].cpu().tolist()
        pes = self.out_pe[sl].cpu().tolist()
        ees = self.out_ee[sl].cpu().tolist()
        finisher = SimpleNamespace(post=self.post)
        for j in range(len(toks)):
            for b, s in enumerate(self.seqs):
                if s.finished:
                    continue
                pe, ee = pes[j][b], ees[j][b]
                s.tokens.append(TokenInfo(toks[j][b], max(logps[j][b], math.log(1e-45)),
                                          pe, ee, max(pe - ee, 0.0)))
                DecodeBatch._update_finish(finisher, s)  # the engine's own stop rules
        self.collected = self.done

    def all_finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def finish_tokens(self) -> list[list[int]]:
        self.collect()
        return [s.token_ids for s in self.seqs]


def generate_fast(post, prompts: Seq[list[int]], params: SamplingParams | Seq[SamplingParams],
                  graph: bool | None = None, sync_every: int = 32) -> list[GenSequence]:
    """Like :func:`tfb_core.generation.generate`, through :class:`FastDecoder` where it applies
    (greedy, one K and weight seed, Llama family), else through ``generate``.

    The host reads the decoded tokens every ``sync_every`` steps to stop early once every
    sequence has finished; tokens past a sequence's stop are computed and discarded.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    seqs = [GenSequence(list(p), sp, id=i) for i, (p, sp) in enumerate(zip(prompts, params))]
    try:
        check_supported(post, seqs)
    except Unsupported:
        return generate(post, prompts, params)
    dec = FastDecoder(post, seqs, graph=graph)
    while not dec.all_finished() and dec.room() > 0:
        for _ in range(min(sync_every, dec.room())):
            dec.step()
        dec.collect()
    return seqs
