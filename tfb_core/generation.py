"""Text generation from the Bayesian model average of K weight samples, with per-token uncertainty.

Each sequence runs K weight samples, each with its own KV cache: a batch of sequences is
``sum_i K_i`` rows. At every step the K next-token distributions of a sequence are averaged
(``p = mean_k softmax(z_k)``, docs/method.md §2), one token is chosen from ``p`` and appended to all
K rows, and the token's predictive entropy, expected entropy and mutual information are kept.

A :class:`DecodeBatch` is the unit of continuous batching: ``prefill`` new sequences,
``concatenate`` them into the running batch between steps, ``step`` once, ``filter`` out what
finished. Rows are left-padded; positions follow the attention mask. With the noise in the last
L layers only (``stochastic_layers``), the layers below N - L run once per sequence, over one
KV cache row per sequence, and fan out to its K rows at layer N - L (:func:`tfb_core.trunk.trunk_forward`).

A step does not edit the sequences while it runs: the forward and :func:`choose_tokens` compute a
:class:`StepResult` (per sequence its :class:`TokenInfo`, or why it has none), and only once both
succeeded :func:`apply` commits it (tokens, text, stop strings, finish reasons, sampling
generators). A step that raises leaves every sequence as it was, with no undo to write.

A :class:`Decoder` is what every engine does (``admit``, ``step``, ``step_each``, ``filter``):
:class:`EagerDecoder` here, the static-cache :class:`~tfb_core.cuda_decode.StaticDecoder` for
CUDA; :func:`tfb_core.engines.make_decoder` picks one. :func:`generate` is the one decode loop
over it.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence as Seq

import torch

from .errors import TFBError
from .models import cache_kwarg, max_context
from .options import NUM_SAMPLES
from .rows import pad, positions, sample_map
from .trunk import new_cache, trunk_forward, trunk_split
from .uncertainty import entropy


@dataclass
class SamplingParams:
    """How to pick tokens from the model average, and when to stop."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # token sampling; None = nondeterministic
    num_samples: int = NUM_SAMPLES  # K weight samples
    weight_seed: int = 0  # which weight samples: (weight_seed, 0..K-1)
    top_logprobs: int = 0  # alternatives to report per token
    ignore_eos: bool = False  # an end-of-sequence token does not end the sequence
    min_tokens: int = 0  # no end-of-sequence token is chosen, and no stop string ends it, before this many
    grammar: str | None = None  # the text must match it (tfb_core.structured.json_grammar); None: free text

    def __post_init__(self):
        if self.max_tokens < 1:
            raise TFBError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise TFBError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TFBError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise TFBError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.num_samples < 1:
            raise TFBError(f"num_samples must be >= 1, got {self.num_samples}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise TFBError(f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}")

    @staticmethod
    def json_grammar(schema: dict | None) -> str:
        """The ``grammar`` that makes the text match the JSON schema ``schema`` (None: any JSON
        object); a TFBError says why llguidance refuses a schema (:func:`tfb_core.structured.json_grammar`)."""
        from .structured import json_grammar

        return json_grammar(schema)


@dataclass
class TokenInfo:
    """One generated token and the uncertainty of the distribution it was drawn from."""

    token_id: int
    logprob: float  # log p(token) under the model average
    predictive_entropy: float
    expected_entropy: float
    mutual_information: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob)
    sample_logprobs: tuple[float, ...] = ()  # log p_k(token) under each of the K weight samples

    @staticmethod
    def field_uncertainty(text: str, pieces: list[str], tokens: Seq["TokenInfo"]) -> dict[str, dict] | None:
        """Per top-level field of the JSON object ``text`` is, the uncertainty of the tokens that
        wrote its value (:func:`tfb_core.structured.field_uncertainty`; ``pieces``: each token's
        text); None when the text is not a JSON object."""
        from .structured import field_uncertainty

        return field_uncertainty(text, pieces, list(tokens))

    @staticmethod
    def summarize(tokens: Seq["TokenInfo"]) -> dict:
        """Mean and max of each uncertainty over ``tokens``, their total logprob, and the sequence's
        own mutual information (:func:`sequence_mutual_information`)."""
        out = {"num_tokens": len(tokens), "total_logprob": float(sum(t.logprob for t in tokens))}
        for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
            values = [getattr(t, name) for t in tokens]
            out[f"mean_{name}"] = float(sum(values) / len(values)) if values else 0.0
            out[f"max_{name}"] = float(max(values)) if values else 0.0
        out["sequence_mutual_information"] = sequence_mutual_information([t.sample_logprobs for t in tokens])
        return out


@dataclass
class GenSequence:
    """One sequence being generated (a request's choice)."""

    prompt_ids: list[int]
    params: SamplingParams
    id: object = None
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    text: str = ""  # the generated text, without a matched stop string
    generator: torch.Generator | None = None  # made from params.seed on the logits' device at its first draw
    error: str | None = None  # why it ended with "error" (its distribution was not finite, or its step failed)
    failure: Exception | None = None  # the exception its own step raised (see Decoder.step_each)
    constraint: object = None  # its place in params.grammar (tfb_core.structured.Constraint), made at its first token
    # incremental detokenization (see decode_new): tokens before prefix_offset are text already;
    # tokens[prefix_offset:read_offset] are decoded again only as context for the new ones
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    def summary(self) -> dict:
        """:meth:`TokenInfo.summarize` over the generated tokens."""
        return TokenInfo.summarize(self.tokens)

    def safe_text(self) -> str:
        """The text that can be shown now: held back while it might be the start of a stop string
        or ends inside a multi-byte character."""
        if self.finished:
            return self.text
        text = self.text
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        hold = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return text[:len(text) - hold]



def sequence_mutual_information(sample_logprobs: Seq[Seq[float]]) -> float:
    """The K weight samples' disagreement about a whole emitted sequence, in nats.

    With ``L_k = sum_t log p_k(y_t | y_<t, x)`` the log-likelihood of the sequence under sample
    k: ``log(mean_k exp(L_k)) - mean_k L_k`` (>= 0 by Jensen; 0 when the samples agree on the
    sequence's probability, whatever it is). ``sample_logprobs``: per token, its K values.
    """
    rows = [r for r in sample_logprobs if len(r)]
    if not rows:
        return 0.0
    L = torch.tensor(rows, dtype=torch.float64).sum(0)  # (K,)
    return max(float(torch.logsumexp(L, 0) - math.log(len(L)) - L.mean()), 0.0)


@dataclass
class Choice:
    """What one step chose for one sequence, not yet committed (see :func:`apply`)."""

    token: TokenInfo | None = None  # None: finished before the step, not finite, or its step failed
    finite: bool = True  # its averaged next-token distribution was a distribution
    generator: torch.Generator | None = None  # its sampling generator after the draw (a copy)
    constraint: object = None  # its grammar's place before the token (made at its first token)
    failure: Exception | None = None  # the exception its own step raised (step_each)


@dataclass
class StepResult:
    """One model step's outcome: per sequence of ``seqs`` (in row order) its :class:`Choice`,
    and the step's duration (forward, token choice and commit, synchronised by the choice)."""

    seqs: list[GenSequence] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    seconds: float = 0.0


def apply(post, result: StepResult) -> None:
    """Commit ``result`` to its sequences: append each chosen token, advance its grammar and
    sampling generator, extend its text (stop strings), set the finish reason of those that
    ended (end of sequence, a stop string, max_tokens, the context, a non-finite distribution,
    a failed step). Called once the forward and the token choice have succeeded."""
    eos, limit, decode = _eos_ids(post.tokenizer, post.model), max_context(post.model), text_decoder(post.tokenizer)
    for s, c in zip(result.seqs, result.choices):
        if s.finished:
            continue
        if c.failure is not None:
            s.finish_reason, s.failure = "error", c.failure
            s.error = f"the decode step failed for this sequence ({type(c.failure).__name__})"
        elif not c.finite:
            s.finish_reason = "error"
            s.error = (f"the model's next-token distribution for this sequence is not finite (NaN or "
                       f"infinite logits) at generated token {len(s.tokens)}; it was stopped alone")
        elif c.token is not None:
            _commit_token(decode, s, c, eos, limit)


def _commit_token(decode, s: GenSequence, c: Choice, eos: set[int], limit: int | None) -> None:
    if c.generator is not None:
        s.generator = c.generator
    if c.constraint is not None:
        s.constraint = c.constraint
    s.tokens.append(c.token)
    refused = s.constraint.consume(c.token.token_id) if s.constraint is not None else None
    if refused is None and s.constraint is not None and s.constraint.stopped:
        s.finish_reason = "stop"  # the grammar is complete: nothing may follow
    update_finish(decode, s, eos, limit)
    if refused is not None:  # not expected: the token was chosen among those its grammar allowed
        s.finish_reason, s.error = "error", f"the output grammar refused token {c.token.token_id}: {refused}"


class DecodeBatch:
    """Sequences decoding together: rows ``[seq 0: K_0 rows][seq 1: K_1 rows]...``.

    ``split``: the layers below it keep one KV cache row per sequence (the trunk the weight
    samples share, :func:`~tfb_core.trunk.trunk_split`); 0 keeps one row per (sequence, weight sample) in every
    layer.
    """

    def __init__(self, post, seqs: list[GenSequence], cache, mask: torch.Tensor,
                 positions: torch.Tensor, last: torch.Tensor, split: int = 0):
        self.post = post
        self.seqs = seqs
        self.cache = cache  # KV cache: one row per sequence below ``split``, per (sequence, sample) from it
        self.mask = mask  # (rows, T) 1 for real tokens, 0 for left padding
        self.positions = positions  # (rows,) position of the next token
        self.last = last  # (rows,) the token to feed next
        self.split = split

    @property
    def rows(self) -> int:
        """Its rows: every sequence's K."""
        return len(self.mask)

    @property
    def kv_layer_rows(self) -> int:
        """KV cache rows summed over the layers: one per sequence in each of the trunk's layers,
        :attr:`rows` in each layer above."""
        return self.split * len(self.seqs) + (len(self.cache.layers) - self.split) * self.rows

    # --- construction -------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def prefill(cls, post, seqs: list[GenSequence], share_trunk: bool = True) -> tuple["DecodeBatch", StepResult]:
        """Run the prompts (x K each) in one forward and choose every sequence's first token:
        the batch, and the choice, not yet committed to ``seqs`` (:func:`apply`). ``share_trunk``:
        the layers below N - L once per sequence (:func:`~tfb_core.trunk.trunk_split`; nothing changes with every
        layer stochastic)."""
        t0 = time.perf_counter()
        ids, mask = prompt_rows(post, seqs)
        dev = next(post.model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        split = trunk_split(post) if share_trunk else 0
        batch = cls(post, seqs, new_cache(post.model), mask, mask.sum(-1), ids[:, -1], split)
        logits = batch._forward(ids, positions(mask))
        batch.last, choices = choose_tokens(post, seqs, logits)
        return batch, StepResult(list(seqs), choices, time.perf_counter() - t0)

    @classmethod
    def concatenate(cls, batches: Seq["DecodeBatch"]) -> "DecodeBatch":
        """One batch from several (a new request joining the running batch between steps), all of
        one ``split``: every layer's rows in batch order (a trunk layer's one per sequence)."""
        batches = [b for b in batches if b.seqs]
        if len(batches) == 1:
            return batches[0]
        if len({b.split for b in batches}) > 1:
            raise ValueError(f"batches of different trunks ({sorted({b.split for b in batches})}) cannot be joined")
        T = max(b.mask.shape[1] for b in batches)
        cache = new_cache(batches[0].post.model)
        keys, values = [], []
        for i in range(len(batches[0].cache.layers)):
            ks, vs = [], []
            for b in batches:
                layer = b.cache.layers[i]
                pad = T - layer.keys.shape[-2]
                ks.append(torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(layer.values, (0, 0, pad, 0)))
            keys.append(torch.cat(ks))
            values.append(torch.cat(vs))
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, i)
        mask = torch.cat([torch.nn.functional.pad(b.mask, (T - b.mask.shape[1], 0)) for b in batches])
        return cls(batches[0].post, [s for b in batches for s in b.seqs], cache, mask,
                   torch.cat([b.positions for b in batches]), torch.cat([b.last for b in batches]), batches[0].split)

    # --- one step ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> StepResult:
        """Feed every row's last token, choose the next token of every unfinished sequence, and
        commit the choice (:func:`apply`).

        All or nothing: if it raises, the batch (KV cache, rows) is as it was before and no
        sequence was touched, ready for :meth:`step_each`.
        """
        t0 = time.perf_counter()
        choices = self._advance()
        result = StepResult(list(self.seqs), choices)
        apply(self.post, result)
        result.seconds = time.perf_counter() - t0
        return result

    @torch.no_grad()
    def step_each(self) -> StepResult:
        """:meth:`step`, one sequence at a time: after a failed step, so only a sequence whose own
        step fails ends (``finish_reason`` "error", its exception in ``failure``); the others get
        the token they get alone."""
        t0 = time.perf_counter()
        parts, choices, row = [], [], 0
        for j, s in enumerate(self.seqs):
            part = self._rows(s, j, row)
            row += s.params.num_samples
            if s.finished:
                choices.append(Choice())
            else:
                try:
                    choices += part._advance()
                except Exception as e:  # this sequence alone; its rows are dropped at the next filter
                    choices.append(Choice(failure=e))
            parts.append(part)
        merged = DecodeBatch.concatenate(parts)  # a part not stepped is one column shorter: left-padded
        self.seqs, self.cache, self.mask = merged.seqs, merged.cache, merged.mask
        self.positions, self.last = merged.positions, merged.last
        result = StepResult(list(self.seqs), choices)
        apply(self.post, result)
        result.seconds = time.perf_counter() - t0
        return result

    def _advance(self) -> list[Choice]:
        """The forward of one step and its token choice, the rows moved on; the sequences are
        not touched. If it raises, the rows and KV cache are as they were."""
        # every field is replaced, not written in place (DynamicLayer.update concatenates):
        # keeping the old objects is the checkpoint
        saved = self.mask, self.positions, self.last, [(l.keys, l.values) for l in self.cache.layers]
        try:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], 1)
            logits = self._forward(self.last[:, None], self.positions[:, None])
            self.positions = self.positions + 1
            self.last, choices = choose_tokens(self.post, self.seqs, logits)
        except BaseException:
            self.mask, self.positions, self.last, layers = saved
            for layer, (k, v) in zip(self.cache.layers, layers):
                layer.keys, layer.values = k, v
            raise
        return choices

    def filter(self) -> list[GenSequence]:
        """Drop finished sequences (and their KV rows); returns the ones dropped."""
        kept, done, keep_rows = split_finished(self.seqs)
        if done:
            idx = torch.tensor(keep_rows, dtype=torch.long, device=self.mask.device)
            trunks = torch.tensor([j for j, s in enumerate(self.seqs) if not s.finished], device=idx.device)
            self.seqs = kept
            self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
            if kept:
                for i, layer in enumerate(self.cache.layers):
                    layer.batch_select_indices(trunks if i < self.split else idx)
                self._trim()
            else:
                self.cache = None
        return done

    # --- internals -----------------------------------------------------------------------

    def _rows(self, s: GenSequence, j: int, row: int) -> "DecodeBatch":
        """Sequence ``s`` (the ``j``-th; rows ``row .. row + K``) as a batch of its own."""
        idx = torch.arange(row, row + s.params.num_samples, device=self.mask.device)
        cache = new_cache(self.post.model)
        for i, layer in enumerate(self.cache.layers):
            pick = idx if i >= self.split else idx[:1] - row + j  # a trunk layer: the sequence's one row
            cache.update(layer.keys[pick], layer.values[pick], i)
        return DecodeBatch(self.post, [s], cache, self.mask[idx], self.positions[idx], self.last[idx], self.split)

    @property
    def _device(self) -> torch.device:
        return next(self.post.model.parameters()).device

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One forward over all rows under their weight samples: last-position logits (rows, V).
        With a trunk, the rows of ``ids`` are read at each sequence's first row."""
        dev = self._device
        samples, slots = self._sample_map()
        if self.split:
            Ks = torch.tensor([s.params.num_samples for s in self.seqs])
            first = Ks.cumsum(0) - Ks  # each sequence's first row
            index = torch.arange(len(Ks)).repeat_interleave(Ks)  # row -> its sequence
            if slots is None:
                slots = torch.tensor(sample_map([(s.params.weight_seed, s.params.num_samples) for s in self.seqs])[1])
            with self.post.mixed_samples(samples, slots):
                logits, _ = trunk_forward(self.post.model, ids[first.to(ids.device)].to(dev),
                                          self.mask[first.to(self.mask.device)].to(dev), self.split, index.to(dev),
                                          self.cache)
            return logits[:, -1].float()
        kwargs = dict(input_ids=ids.to(dev), attention_mask=self.mask.to(dev),
                      position_ids=position_ids.to(dev), use_cache=True, logits_to_keep=1)
        kwargs[cache_kwarg(self.post.model)] = self.cache
        if slots is None:
            with self.post.samples(num_samples=len(samples), seed=samples[0][0]):
                out = self.post.model(**kwargs)
        else:
            with self.post.mixed_samples(samples, slots):
                out = self.post.model(**kwargs)
        return out.logits[:, -1].float()

    def _sample_map(self):
        """The weight samples of the rows: regular (one seed and K for all) or a slot map."""
        groups = [(s.params.weight_seed, s.params.num_samples) for s in self.seqs]
        keys, slots = sample_map(groups)
        if len(set(groups)) == 1:
            return keys, None
        return keys, torch.tensor(slots, dtype=torch.long)

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        real = self.mask.any(0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., start:, :]
                layer.values = layer.values[..., start:, :]


def kv_rows(num_samples: int, layers: int, shared: int = 0) -> int:
    """The KV cache one sequence of ``num_samples`` weight samples holds, in rows of every one
    of the model's ``layers`` layers (rounded up): the unit of a server's KV budget. K rows in
    each layer; with a shared trunk (the noise in the layers from ``shared`` up) one row in each
    of the ``shared`` layers below and K above: K = 10 with the noise in the last 4 of 32 layers
    holds (28 + 4 x 10) / 32, 3 rows, not 10."""
    return -(-(shared + (layers - shared) * num_samples) // layers)


def check_prompts(post, seqs: Seq[GenSequence]) -> None:
    """A TFBError for an empty prompt, or one that leaves no room in the model's context."""
    limit = max_context(post.model)
    for s in seqs:
        if not s.prompt_ids:
            raise TFBError("the prompt is empty")
        if limit is not None and len(s.prompt_ids) >= limit:
            raise TFBError(f"the prompt is {len(s.prompt_ids)} tokens long; the model's context is {limit} tokens")


def prompt_rows(post, seqs: Seq[GenSequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of ``seqs`` (checked), K rows each, left-padded: ids, mask (CPU)."""
    check_prompts(post, seqs)
    return pad([s.prompt_ids for s in seqs for _ in range(s.params.num_samples)], value=pad_token(post.tokenizer))


def split_finished(seqs: Seq[GenSequence]) -> tuple[list[GenSequence], list[GenSequence], list[int]]:
    """(unfinished, finished, the unfinished ones' rows) of sequences laid out
    ``[seq 0: K_0 rows][seq 1: K_1 rows]...``."""
    kept, done, rows, row = [], [], [], 0
    for s in seqs:
        K = s.params.num_samples
        if s.finished:
            done.append(s)
        else:
            kept.append(s)
            rows.extend(range(row, row + K))
        row += K
    return kept, done, rows


def choose_tokens(post, seqs: Seq[GenSequence], logits: torch.Tensor) -> tuple[torch.Tensor, list[Choice]]:
    """Average each sequence's K distributions, pick its token, measure its uncertainty.

    ``logits``: (rows, V), the rows of ``seqs`` in order (K_i rows each). All sequences at
    once on the model's device; one transfer to the host per step (plus one per sequence that
    samples with a temperature). Returns the token to feed next, per row, and each sequence's
    :class:`Choice`; ``seqs`` are not changed (a draw advances a copy of the generator).
    """
    probs = torch.softmax(logits, -1)  # (rows, V)
    Ks = [s.params.num_samples for s in seqs]
    S, dev = len(Ks), probs.device
    same_k = len(set(Ks)) == 1
    if same_k:  # rows b*K + k: a view
        pk = probs.view(S, Ks[0], -1)
        p, ee = pk.mean(1), entropy(pk).mean(1)  # (S, V), (S,)
    else:
        counts = torch.tensor(Ks, device=dev)
        seg = torch.arange(S, device=dev).repeat_interleave(counts, output_size=sum(Ks))
        k = counts.to(probs.dtype)
        p = torch.zeros(S, probs.shape[1], device=dev, dtype=probs.dtype).index_add_(0, seg, probs) / k[:, None]
        ee = torch.zeros(S, device=dev, dtype=probs.dtype).index_add_(0, seg, entropy(probs)) / k
    pe = entropy(p)
    # a sequence whose average is not a distribution (NaN or infinite logits) ends alone
    finite = torch.isfinite(p).all(-1) & (p.sum(-1) > 0)  # (S,)
    grammar = constraints(post, seqs)
    pick = constrained(seqs, grammar, without_eos(post, seqs, p))  # the choice's distribution; the uncertainty stays p's
    tokens = torch.where(finite, pick.argmax(-1), 0)  # greedy; sampled sequences are replaced below
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0 and not s.finished]
    generators: list[torch.Generator | None] = [None] * S
    if sampled:
        for i in sampled:
            generators[i] = next_generator(seqs[i], dev)
        idx = torch.tensor(sampled, device=dev)
        drawn = sample_tokens(pick[idx], [seqs[i].params for i in sampled], [generators[i] for i in sampled])
        tokens[idx] = torch.where(finite[idx], drawn, tokens[idx])
    logp = torch.log(p.gather(1, tokens[:, None]).squeeze(1).clamp_min(1e-45))
    # the output's size given: the device need not be asked for it (a sync) in the middle of the step
    rows_out = tokens.repeat_interleave(Ks[0]) if same_k else tokens.repeat_interleave(counts, output_size=sum(Ks))
    sample_lp = torch.log(probs.gather(1, rows_out[:, None]).squeeze(1).clamp_min(1e-45))  # (rows,)
    n_top = max((s.params.top_logprobs for s in seqs), default=0)
    top_v, top_i = p.topk(n_top) if n_top else (p[:, :0], tokens[:, None][:, :0])
    host = torch.cat([torch.stack([pe, ee, logp, finite.to(pe.dtype)]).flatten(),
                      sample_lp.to(pe.dtype)]).double().cpu()  # the one sync of the step
    stats, per_row = host[:4 * S].view(4, S).tolist(), host[4 * S:].tolist()
    token_ids, top_v, top_i = tokens.cpu().tolist(), top_v.double().cpu(), top_i.cpu()
    starts = [0]
    for k in Ks:
        starts.append(starts[-1] + k)
    choices = []
    for i, s in enumerate(seqs):
        if s.finished or not stats[3][i]:
            choices.append(Choice(finite=s.finished or bool(stats[3][i])))
            continue
        pe_i, ee_i, lp_i = stats[0][i], stats[1][i], stats[2][i]
        n = s.params.top_logprobs
        top = [(int(t), math.log(max(v, 1e-45))) for v, t in zip(top_v[i, :n].tolist(), top_i[i, :n].tolist())] \
            if n else []
        token = TokenInfo(token_ids[i], lp_i, pe_i, ee_i, max(pe_i - ee_i, 0.0), top,
                          tuple(per_row[starts[i]:starts[i + 1]]))
        made = grammar[i] if grammar[i] is not s.constraint else None
        choices.append(Choice(token, True, generators[i], made))
    return rows_out, choices


def next_generator(s: GenSequence, device: torch.device) -> torch.Generator | None:
    """The generator ``s``'s next draw uses, as a copy (the draw advances the copy; :func:`apply`
    keeps it): its own, made from ``params.seed`` on ``device`` at its first draw; None (the
    device's default generator) without a seed."""
    if s.params.seed is None:
        return None
    g = torch.Generator(device)
    if s.generator is not None and s.generator.device == device:
        g.set_state(s.generator.get_state())
    else:
        g.manual_seed(s.params.seed)
    return g


def without_eos(post, seqs: Seq[GenSequence], p: torch.Tensor) -> torch.Tensor:
    """``p`` (S, V) with the end-of-sequence tokens' probability set to 0 for each sequence
    below its ``min_tokens`` (where some other token has probability left); ``p`` itself when
    none is."""
    rows = [i for i, s in enumerate(seqs) if len(s.tokens) < s.params.min_tokens and not s.finished]
    if not rows:
        return p
    eos = torch.tensor(sorted(_eos_ids(post.tokenizer, post.model)), dtype=torch.long, device=p.device)
    idx = torch.tensor(rows, device=p.device)
    masked = p[idx].index_fill(1, eos, 0.0)
    keep = masked.sum(-1, keepdim=True) > 0
    return p.index_copy(0, idx, torch.where(keep, masked, p[idx]))


def constraints(post, seqs: Seq[GenSequence]) -> list:
    """Each sequence's place in its grammar (:class:`~tfb_core.structured.Constraint`): its own,
    or a new one at its first token (kept by :func:`apply`); None without a grammar."""
    from .structured import Constraint

    return [None if s.params.grammar is None or s.finished else
            s.constraint if s.constraint is not None else Constraint(post, s.params.grammar) for s in seqs]


def constrained(seqs: Seq[GenSequence], grammar: list, p: torch.Tensor) -> torch.Tensor:
    """``p`` (S, V) with the tokens each sequence's grammar (``grammar``: see
    :func:`constraints`) forbids set to 0 (uniform over the allowed ones where the model left
    them no probability: the output stays valid); ``p`` itself when no sequence has a grammar."""
    rows = [i for i, g in enumerate(grammar) if g is not None]
    if not rows:
        return p
    allowed = torch.stack([grammar[i].allowed() for i in rows]).to(p.device)  # (R, V)
    idx = torch.tensor(rows, device=p.device)
    masked = torch.where(allowed, p[idx], 0.0)
    masked = torch.where(masked.sum(-1, keepdim=True) > 0, masked, allowed.to(p.dtype))
    return p.index_copy(0, idx, masked)


def update_finish(decode: Callable[[list[int]], str], s: GenSequence, eos: set[int], limit: int | None) -> None:
    """Extend ``s.text`` by its newest token (``decode``: see :func:`text_decoder`) and, once it
    ends (an ``eos`` token, a stop string, max_tokens, the context of ``limit`` tokens), set its
    finish reason."""
    may_stop = len(s.tokens) >= s.params.min_tokens
    if not s.params.ignore_eos and may_stop and s.tokens[-1].token_id in eos:
        s.finish_reason = "stop"
    at_end = s.finish_reason is not None or len(s.tokens) >= s.params.max_tokens or \
        (limit is not None and len(s.prompt_ids) + len(s.tokens) >= limit)
    new = decode_new(decode, s, final=at_end)
    if new:
        start = max(0, len(s.text) - max((len(x) for x in s.params.stop), default=0))  # a stop may span steps
        s.text += new
        hits = [at for at in (s.text.find(stop, start) for stop in s.params.stop if stop) if at >= 0] \
            if may_stop else []
        if hits:  # the earliest stop string wins
            s.text = s.text[:min(hits)]
            s.finish_reason = "stop"
            return
    if s.finish_reason is None and at_end:
        s.finish_reason = "length"


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """``ids -> tokenizer.decode(ids, skip_special_tokens=True)``, through the fast tokenizer's
    own (Rust) decoder when that is the same thing (no clean-up of spaces): it skips the Python
    layer of ``tokenizer.decode``, which runs twice per generated token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


def decode_new(decode: Callable[[list[int]], str], s: GenSequence, final: bool = False) -> str:
    """The text ``s``'s newest tokens add, decoding a few tokens, not the whole sequence.

    Incremental detokenization (as TGI and vLLM do): decode the tokens from ``prefix_offset``
    with and without those past ``read_offset`` and keep the difference, so a token's cost does
    not grow with the sequence. While the window ends inside a multi-byte character (decoded as
    U+FFFD) nothing is returned and the window grows, unless ``final`` (the sequence ends here:
    what full decoding shows). Joined, the pieces are ``tokenizer.decode(s.token_ids,
    skip_special_tokens=True)`` for byte-level and SentencePiece tokenizers.
    """
    window = [t.token_id for t in s.tokens[s.prefix_offset:]]
    prefix = decode(window[:s.read_offset - s.prefix_offset])
    full = decode(window)
    if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
        s.prefix_offset, s.read_offset = s.read_offset, len(s.tokens)
        return full[len(prefix):]
    if final:
        s.prefix_offset = s.read_offset = len(s.tokens)
    elif len(full) == len(prefix) and not full.endswith("\ufffd"):  # tokens that show nothing (special
        s.read_offset = len(s.tokens)  # ones): done; the window keeps at most 8 tokens of context
        s.prefix_offset = max(s.prefix_offset, s.read_offset - 8)
    return ""


def sample_tokens(p: torch.Tensor, params: Seq[SamplingParams],
                  generators: Seq[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``p`` (S, V), all rows at once on p's device (no copy to the host):
    row i greedy at temperature 0, else drawn from ``softmax(log p_i / T_i)`` after its top-k,
    then its top-p (the smallest set of tokens reaching ``top_p``), renormalised.

    In log space: ``log p / T`` is finite for every token with ``p > 0`` at any T > 0, where
    ``p ** (1 / T)`` underflows to 0 for every token at small T (and 0 / 0 is NaN). The draw is
    an exponential race, ``argmax_j q_j / E_j`` with ``E_j ~ Exp(1)``, which picks j with
    probability ``q_j``; row i's ``E`` comes from ``generators[i]`` (seeded: reproducible), or
    from the device's default generator when None.
    """
    S, V = p.shape
    dev = p.device
    T = torch.tensor([sp.temperature for sp in params], dtype=torch.float64, device=dev)
    logits = torch.log(p.double().clamp_min(0)) / T.clamp_min(1e-300)[:, None]  # -inf where p == 0
    top_k = [min(sp.top_k, V) if sp.top_k else V for sp in params]
    top_p = [sp.top_p for sp in params]
    if min(top_k) < V or min(top_p) < 1:
        ranked, order = logits.sort(-1, descending=True)
        kth = ranked.gather(1, torch.tensor(top_k, device=dev)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
        q = torch.softmax(logits, -1)
        if min(top_p) < 1:
            sorted_q = q.gather(1, order)
            cut = torch.tensor(top_p, dtype=q.dtype, device=dev)[:, None]
            drop = (sorted_q.cumsum(-1) - sorted_q >= cut) & (cut < 1)  # top_p 1: rounding drops nothing
            q = torch.zeros_like(q).scatter(1, order, sorted_q.masked_fill(drop, 0.0))
            q = q / q.sum(-1, keepdim=True)
    else:
        q = torch.softmax(logits, -1)
    race = torch.empty_like(q).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            race[i].exponential_(generator=g)
    drawn = torch.where(q > 0, q / race, -1.0).argmax(-1)  # a token of probability 0 never wins (0 / 0)
    return torch.where(T > 0, drawn, p.argmax(-1))


def pad_token(tokenizer) -> int:
    """The id that pads rows: the tokenizer's pad token, else its EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (tokenizer.eos_token_id, gen_eos):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(e)
    return ids


class Decoder(Protocol):
    """A running decode batch, whatever the engine: the one lifecycle the server drives.

    ``admit`` new sequences between steps (prefilled by the engine's own forward, their first
    token chosen); ``step`` every active sequence once; after a failed step, ``step_each`` (one
    sequence at a time, so only a sequence whose own step fails ends); ``filter`` out the
    finished sequences, freeing their KV rows. ``admit``, ``step`` and ``step_each`` return the
    :class:`StepResult` they committed; one that raises has changed no sequence and no active row.
    """

    @property
    def seqs(self) -> list[GenSequence]:
        """The active sequences, in row order."""

    @property
    def kv_rows(self) -> int:
        """KV cache rows held by the active sequences, in rows of every layer (a server's KV
        budget): the sum of each sequence's :func:`kv_rows`, its K or fewer with a shared trunk."""

    @property
    def kv_layer_rows(self) -> int:
        """KV cache rows held summed over the layers."""

    def admit(self, seqs: list[GenSequence]) -> StepResult:
        """Prefill new sequences (K rows each), choose their first token, join them."""

    def step(self) -> StepResult: ...

    def step_each(self) -> StepResult: ...

    def filter(self) -> list[GenSequence]: ...


class EagerDecoder:
    """The :class:`Decoder` over HF transformers' eager forward: a :class:`DecodeBatch` (with
    its ``DynamicCache``) that joining batches are concatenated into; none is held while no
    sequence is active, so an idle decoder holds no KV cache."""

    def __init__(self, post, share_trunk: bool = True):
        self.post = post
        self.share_trunk = share_trunk  # see DecodeBatch.prefill
        self.batch: DecodeBatch | None = None

    @property
    def seqs(self) -> list[GenSequence]:
        return self.batch.seqs if self.batch is not None else []

    @property
    def kv_rows(self) -> int:
        """See :attr:`Decoder.kv_rows`."""
        if self.batch is None:
            return 0
        N, split = self.post.num_layers, self.batch.split
        return sum(kv_rows(s.params.num_samples, N, split) for s in self.seqs)

    @property
    def kv_layer_rows(self) -> int:
        """See :attr:`DecodeBatch.kv_layer_rows`."""
        return self.batch.kv_layer_rows if self.batch is not None else 0

    def admit(self, seqs: list[GenSequence]) -> StepResult:
        """All or nothing: if it raises, ``seqs`` (their first token, text, generator) and the
        running batch are as they were."""
        t0 = time.perf_counter()
        batch, result = DecodeBatch.prefill(self.post, seqs, self.share_trunk)
        self.batch = batch if self.batch is None else DecodeBatch.concatenate([self.batch, batch])
        apply(self.post, result)
        result.seconds = time.perf_counter() - t0
        return result

    def step(self) -> StepResult:
        return self.batch.step() if self.batch is not None else StepResult()

    def step_each(self) -> StepResult:
        return self.batch.step_each() if self.batch is not None else StepResult()

    def filter(self) -> list[GenSequence]:
        if self.batch is None:
            return []
        done = self.batch.filter()
        if not self.batch.seqs:
            self.batch = None
        return done


def generate(post, prompts: Seq[list[int]], params: SamplingParams | Seq[SamplingParams],
             decoder: Decoder | None = None) -> list[GenSequence]:
    """Generate for several prompts in one decode loop.

    Parameters
    ----------
    decoder : Decoder, default=None
        The engine: a new :class:`EagerDecoder` when None;
        :func:`tfb_core.engines.make_decoder` makes one for any engine.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    seqs = [GenSequence(list(p), sp, id=i) for i, (p, sp) in enumerate(zip(prompts, params))]
    decoder = EagerDecoder(post) if decoder is None else decoder
    decoder.admit(seqs)
    decoder.filter()
    while decoder.seqs:
        decoder.step()
        decoder.filter()
    return seqs
