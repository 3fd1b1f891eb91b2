"""Multiple-choice scoring over prompts x K weight samples (docs/method.md §3).

Two modes, both giving a distribution over the C choices per weight sample:

- ``letter``: the choices are listed with labels A, B, ... in the prompt; the next-token
  logits at the last prompt position, restricted to the label tokens, renormalised.
- ``sequence``: ``log p(choice | prompt)`` summed over the choice's tokens (optionally
  divided by its token count), softmax over the choices.

Sequences are left-padded so the last real token of every row sits at the last position;
position ids follow the attention mask, so padding does not change any real token's output.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import MCItem
from .encoding import Encoded, encode_item
from .errors import TFBError
from .generation import TokenInfo
from .trunk import new_cache, trunk_forward, trunk_split
from .models import cache_kwarg, max_context, output_cache  # noqa: F401 (max_context: re-exported)
from .options import Mode, parse_mode
from .rows import pad, positions, sample_map
from .uncertainty import Uncertainty, decompose, entropy


def choice_probs(post, encoded: Sequence[Encoded], samples: Sequence[tuple[int, int]],
                 sigma: float | None = None, engine=None, share_prefix: bool = True) -> list[torch.Tensor]:
    """Per-sample choice probabilities for several encoded items in one batched pass.

    The softmax over choices of :func:`choice_scores` (same parameters); float32 (K_i, C_i).
    """
    scores = choice_scores(post, encoded, samples, sigma, engine, share_prefix)
    return [torch.softmax(s, -1).float() for s in scores]


@torch.no_grad()
def choice_scores(post, encoded: Sequence[Encoded], samples: Sequence[tuple[int, int]],
                  sigma: float | None = None, engine=None, share_prefix: bool = True) -> list[torch.Tensor]:
    """Per-sample choice scores (log-likelihoods) for several encoded items in ONE forward.

    letter: each label token's log-probability after the prompt; sequence:
    ``log p(choice | prompt)`` summed over the choice's tokens, or divided by its token count
    when the item is ``length_normalize``-d.

    Parameters
    ----------
    post : Posterior
    encoded : sequence of Encoded
    samples : sequence of (seed, K), one per item
        Item i runs weight samples (seed_i, 0..K_i-1). Items may differ in seed and K.
    sigma : float, default=None
        Another sigma than the posterior's (the variance search); runs the eager forward.
    engine : tfb_core.cuda_prefill.PrefillEngine, default=None
        Run the forward through it (CUDA graphs, fused kernels) instead of HF's eager forward.
    share_prefix : bool, default=True
        Eager forward: run each prompt once per weight sample and score the choices as
        continuations of its KV cache (:func:`shared_prefix_scores`), instead of one row per
        choice that repeats the prompt. Same scores up to rounding.

    Returns a list of float64 tensors of shape (K_i, C_i).
    """
    if not encoded or len(encoded) != len(samples):
        raise TFBError(f"choice_probs needs one (seed, K) per item: {len(encoded)} items, {len(samples)} samples")
    if any(K < 1 for _, K in samples):
        raise TFBError("num_samples must be >= 1")
    if share_prefix and (engine is None or sigma is not None):
        return shared_prefix_scores(post, encoded, samples, sigma)
    owners = [(i, j, k) for i, (enc, (_, K)) in enumerate(zip(encoded, samples))
              for j in range(len(enc.sequences)) for k in range(K)]  # one per (item, sequence, sample) row
    rows = [encoded[i].sequences[j] for i, j, _ in owners]
    keys, slot_ids = sample_map(samples[i] for i, enc in enumerate(encoded) for _ in enc.sequences)
    keep = max(len(t) for enc in encoded for t in _kept(enc)) + 1
    regular = len({s for s in samples}) == 1  # one (seed, K) for all: row b*K + k -> sample k
    if engine is not None and sigma is None:
        logits = engine.logits(rows, keep, keys, slot_ids)
    elif regular:
        with post.samples(num_samples=samples[0][1], seed=samples[0][0], sigma=sigma):
            logits = _forward(post.model, rows, keep)
    else:
        slots = torch.tensor(slot_ids, dtype=torch.long)
        with post.mixed_samples(keys, slots, sigma=sigma):
            logits = _forward(post.model, rows, keep)
    # logits: (rows, keep, V) of the last `keep` positions; only the scored log-probs are computed
    logprobs = target_log_probs(logits, [_wanted(encoded[i], j, keep) for i, j, _ in owners])
    scores = [torch.empty(K, enc.num_choices, dtype=torch.float64) for enc, (_, K) in zip(encoded, samples)]
    for (i, j, k), lp in zip(owners, logprobs):
        enc = encoded[i]
        if enc.mode is Mode.LETTER:
            scores[i][k] = lp
        else:
            scores[i][k, j] = lp.sum() / len(lp) if enc.length_normalize else lp.sum()
    return scores


@torch.no_grad()
def score_prompts(post, prompts: Sequence[list[int]], samples: Sequence[tuple[int, int]], top_logprobs: int = 0,
                  sigma: float | None = None, engine=None) -> list[list[TokenInfo]]:
    """How the posterior scores given texts, token by token: prompt scoring (teacher-forced).

    ONE forward over ``sum_i K_i`` rows (each prompt once per weight sample, left-padded, as
    :func:`choice_scores` runs its rows); every position's K next-token distributions are
    averaged as generation averages them (:func:`tfb_core.generation.choose_tokens`), and the
    prompt's own next token is scored under the average and under each sample.

    Parameters
    ----------
    prompts : sequence of list of int
        Token ids, each at least one token long.
    samples : sequence of (seed, K), one per prompt
        Prompt i runs weight samples (seed_i, 0..K_i-1).
    top_logprobs : int, default=0
        The most probable tokens under the average to report at each position.
    sigma : float, default=None
        Another sigma than the posterior's; runs the eager forward.
    engine : tfb_core.cuda_prefill.PrefillEngine, default=None
        Run the forward through it instead of HF's eager forward.

    Returns, per prompt, a :class:`~tfb_core.generation.TokenInfo` for each token but the first
    (nothing predicts the first): its log-probability under the model average, PE, EE, MI of
    the distribution it was read from, its top alternatives and its K samples' log-probabilities.
    """
    if not prompts or len(prompts) != len(samples):
        raise TFBError(f"score_prompts needs one (seed, K) per prompt: {len(prompts)} prompts, "
                       f"{len(samples)} samples")
    if any(not p for p in prompts) or any(K < 1 for _, K in samples):
        raise TFBError("every prompt needs at least one token, and num_samples must be >= 1")
    rows = [list(p) for p, (_, K) in zip(prompts, samples) for _ in range(K)]
    keys, slot_ids = sample_map(samples)
    keep = max(len(p) for p in prompts)
    if engine is not None and sigma is None:
        logits = engine.logits(rows, keep, keys, slot_ids)
    elif len(set(samples)) == 1:  # row b*K + k -> sample k
        with post.samples(num_samples=samples[0][1], seed=samples[0][0], sigma=sigma):
            logits = _forward(post.model, rows, keep)
    else:
        with post.mixed_samples(keys, torch.tensor(slot_ids, dtype=torch.long), sigma=sigma):
            logits = _forward(post.model, rows, keep)
    # logits: (rows, keep, V), left-padded: prompt i's position t predicts its token t + 1
    out, row = [], 0
    for prompt, (_, K) in zip(prompts, samples):
        L = len(prompt)
        out.append(token_infos(logits[row:row + K, keep - L:keep - 1], prompt[1:], top_logprobs))
        row += K
    return out


def token_infos(logits: torch.Tensor, targets: Sequence[int], top_logprobs: int = 0,
                chunk_elements: int = 1 << 24) -> list[TokenInfo]:
    """``targets[t]`` scored under the K distributions ``logits[:, t]`` (K, T, V) and their average.

    The softmax is taken ``chunk_elements`` logits at a time (no (K, T, V) float32 copy);
    float32 as in generation, so a text scored here gets the numbers generating it gave.
    """
    K, T, V = logits.shape
    step = max(1, chunk_elements // (K * V))
    infos = []
    for start in range(0, T, step):
        probs = torch.softmax(logits[:, start:start + step].float(), -1)  # (K, c, V)
        c = probs.shape[1]
        tgt = torch.tensor(targets[start:start + c], device=probs.device)
        p = probs.mean(0)  # (c, V) the model average
        pe, ee = entropy(p), entropy(probs).mean(0)  # (c,)
        at = torch.arange(c, device=probs.device)
        lp = torch.log(p[at, tgt].clamp_min(1e-45))
        sample_lp = torch.log(probs[:, at, tgt].clamp_min(1e-45)).T  # (c, K)
        top_v, top_i = p.topk(top_logprobs) if top_logprobs else (p[:, :0], tgt[:, None][:, :0])
        stats = torch.stack([pe, ee, lp]).double().cpu().tolist()
        per_sample = sample_lp.double().cpu().tolist()
        top_lp = torch.log(top_v.clamp_min(1e-45)).double().cpu().tolist()
        top_ids = top_i.cpu().tolist()
        for j in range(c):
            pe_j, ee_j, lp_j = stats[0][j], stats[1][j], stats[2][j]
            infos.append(TokenInfo(int(targets[start + j]), lp_j, pe_j, ee_j, max(pe_j - ee_j, 0.0),
                                   list(zip(top_ids[j], top_lp[j])), tuple(per_sample[j])))
    return infos


def shared_prefix_scores(post, encoded: Sequence[Encoded], samples: Sequence[tuple[int, int]],
                         sigma: float | None = None) -> list[torch.Tensor]:
    """:func:`choice_scores` with every prompt run once per weight sample.

    1. Prefix pass: one row per (item, sample k), the prompt left-padded, KV cache kept; its
       last logits give the letter scores and each choice's first token.
    2. Continuation pass (sequence items): one row per (item, choice, k), the choice's tokens
       but the last, right-padded, attending to the prefix row's cache (copied per choice).
    Cost: K x prompt + C x K x choice tokens, instead of C x K x (prompt + choice). With the
    noise in the last L layers only (:func:`~tfb_core.trunk.trunk_split`), both passes run the layers below
    N - L once per prompt (per (prompt, choice) for the continuations) and fan out to the K
    samples' rows there (:func:`~tfb_core.trunk.trunk_forward`).
    """
    prefix, first = [], {}  # first[(i, k)] = the item's prefix row
    for i, (enc, (seed, K)) in enumerate(zip(encoded, samples)):
        prompt = enc.sequences[0][:len(enc.sequences[0]) - (0 if enc.mode is Mode.LETTER else len(enc.targets[0]))]
        for k in range(K):
            first[i, k] = len(prefix)
            prefix.append(prompt)
    samples_list, prefix_slots = sample_map(samples)
    keys = {key: slot for slot, key in enumerate(samples_list)}
    device = next(post.model.parameters()).device
    split = trunk_split(post)
    trunk, index = distinct_rows(prefix) if split else (prefix, None)
    ids, mask, position_ids = left_pad(trunk, max(len(r) for r in prefix))
    with post.mixed_samples(samples_list, torch.tensor(prefix_slots), sigma=sigma):
        if index is not None:  # layers below N - L once per prompt, then each sample's row
            logits, cache = trunk_forward(post.model, ids.to(device), mask.to(device), split, index.to(device),
                                          new_cache(post.model))
            mask = mask[index]
        else:
            out = post.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1)
            logits, cache = out.logits, output_cache(out)
    last = logits[:, -1]  # (prefix rows, V)
    last_lse = last.float().logsumexp(-1)
    scores = [torch.empty(K, enc.num_choices, dtype=torch.float64) for enc, (_, K) in zip(encoded, samples)]
    conts, owners, cont_slots, parents = [], [], [], []  # continuation rows (i, j, k)
    for i, (enc, (seed, K)) in enumerate(zip(encoded, samples)):
        for k in range(K):
            r = first[i, k]
            if enc.mode is Mode.LETTER:
                labels = torch.tensor(enc.targets[0], device=device)
                scores[i][k] = (last[r, labels].float() - last_lse[r]).double().cpu()
                continue
            for j, cont in enumerate(enc.targets):
                scores[i][k, j] = float(last[r, cont[0]].float() - last_lse[r])
                if len(cont) > 1:
                    conts.append(cont[:-1])
                    owners.append((i, j, k))
                    cont_slots.append(keys[samples[i][0], k])
                    parents.append(r)
    if conts:
        cont_ids, cont_mask = right_pad(conts)
        width = cont_ids.shape[1]
        parent = torch.tensor(parents)
        full_mask = torch.cat([mask[parent], cont_mask], 1)
        positions = mask[parent].sum(1, keepdim=True) + torch.arange(width)[None]
        with post.mixed_samples(samples_list, torch.tensor(cont_slots), sigma=sigma):
            if index is not None:  # one trunk row per (prompt, choice), its cache the prompt's trunk row's
                groups, cont_index = distinct_rows([(int(index[p]), *c) for p, c in zip(parents, conts)])
                cont_trunk = torch.tensor([g[0] for g in groups])
                first = {}
                for r, g in enumerate(cont_index.tolist()):
                    first.setdefault(g, r)  # a row of each group
                first = list(first.values())
                for i, layer in enumerate(cache.layers):
                    layer.batch_select_indices((cont_trunk if i < split else parent).to(device))
                logits, _ = trunk_forward(post.model, cont_ids[first].to(device), full_mask[first].to(device),
                                          split, cont_index.to(device), cache, keep=width)
            else:
                cache.batch_select_indices(parent.to(device))
                logits = post.model(input_ids=cont_ids.to(device), attention_mask=full_mask.to(device),
                                    position_ids=positions.to(device), use_cache=False,
                                    **{cache_kwarg(post.model): cache}).logits
        wanted = [(list(range(len(c))), encoded[i].targets[j][1:]) for c, (i, j, _) in zip(conts, owners)]
        for (i, j, k), lp in zip(owners, target_log_probs(logits, wanted)):
            scores[i][k, j] += lp.sum()
    for enc, s in zip(encoded, scores):
        if enc.mode is Mode.SEQUENCE and enc.length_normalize:
            s /= torch.tensor([len(t) for t in enc.targets], dtype=torch.float64)
    return scores


def distinct_rows(rows: Sequence) -> tuple[list, torch.Tensor]:
    """(the distinct rows in order of first appearance, row -> its index among them)."""
    first: dict[tuple, int] = {}
    index = [first.setdefault(tuple(r), len(first)) for r in rows]
    return [list(r) for r in first], torch.tensor(index, dtype=torch.long)


def _kept(enc: Encoded) -> list[list[int]]:
    return [[]] if enc.mode is Mode.LETTER else enc.targets


def _wanted(enc: Encoded, j: int, keep: int) -> tuple[list[int], list[int]]:
    """(positions, tokens) among the last ``keep`` positions whose log-probs score sequence j."""
    if enc.mode is Mode.LETTER:
        labels = enc.targets[0]
        return [keep - 1] * len(labels), labels  # the label tokens after the prompt
    cont = enc.targets[j]
    return list(range(keep - 1 - len(cont), keep - 1)), cont  # the logits that predict the choice


def _forward(model, rows: list[list[int]], keep: int) -> torch.Tensor:
    """Left-padded forward; the logits of the last ``keep`` positions: (rows, keep, V)."""
    device = next(model.parameters()).device
    ids, mask, position_ids = left_pad(rows, max(len(r) for r in rows))
    return model(input_ids=ids.to(device), attention_mask=mask.to(device),
                 position_ids=position_ids.to(device), logits_to_keep=keep, use_cache=False).logits


def left_pad(rows: Sequence[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows left-padded (with 0) to ``length``: ids, attention mask, position ids (CPU)."""
    ids, mask = pad(rows, length, "left")
    return ids, mask, positions(mask)


def right_pad(rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded (with 0) to the longest: ids and attention mask (CPU)."""
    return pad(rows, side="right")


def target_log_probs(logits: torch.Tensor, wanted: Sequence[tuple[list[int], list[int]]],
                     chunk_elements: int = 1 << 24) -> list[torch.Tensor]:
    """``log_softmax(logits)[b, p, t]`` for each row b's wanted (positions p, tokens t).

    The log-normaliser (logsumexp over V) is computed in float32, ``chunk_elements`` logits at a
    time, so no (rows, keep, V) float32 copy is ever built. logits : (rows, keep, V), any float
    dtype. Returns per row a float64 CPU tensor with one log-prob per wanted (p, t).
    """
    R, keep, V = logits.shape
    lse = torch.empty(R, keep, device=logits.device)  # float32
    step = max(1, chunk_elements // (keep * V))
    for start in range(0, R, step):
        lse[start:start + step] = logits[start:start + step].float().logsumexp(-1)
    counts = [len(tokens) for _, tokens in wanted]
    row = torch.repeat_interleave(torch.arange(R), torch.tensor(counts)).to(logits.device)
    pos = torch.tensor([p for positions, _ in wanted for p in positions], device=logits.device)
    tok = torch.tensor([t for _, tokens in wanted for t in tokens], device=logits.device)
    picked = logits[row, pos, tok].float() - lse[row, pos]
    return list(picked.double().cpu().split(counts))


def score_items(post, items: Sequence[MCItem], mode: Mode | str = Mode.LETTER,
                num_samples: int | None = None, seed: int | None = None, sigma: float | None = None,
                batch_size: int = 8, chat: bool = False, length_normalize: bool = False,
                progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Per-sample choice probabilities for a list of items: (N, K, C).

    ``batch_size`` items (x K samples x choices in sequence mode) go through one forward.
    Items with fewer than C (the largest count) choices are padded with probability 0, which
    changes no entropy, argmax, NLL, Brier or ECE.
    """
    if not items:
        raise TFBError("no items to score")
    K = num_samples or post.config.num_samples
    seed = post.config.seed if seed is None else seed
    mode = parse_mode(mode)
    limit = max_context(post.model)
    encoded = [encode_item(post.tokenizer, it, mode, chat, length_normalize, limit) for it in items]
    C = max(e.num_choices for e in encoded)
    out = []
    for start in tqdm(range(0, len(encoded), batch_size), desc=desc, disable=not progress,
                      unit="batch", leave=False):
        chunk = encoded[start:start + batch_size]
        out.extend(choice_probs(post, chunk, [(seed, K)] * len(chunk), sigma))
    return torch.stack([torch.nn.functional.pad(p, (0, C - p.shape[-1])) for p in out])


def predict(post, items: Sequence[MCItem], **kwargs) -> Uncertainty:
    """The Bayesian model average over K weight samples and its uncertainty, per item."""
    return decompose(score_items(post, items, **kwargs))
