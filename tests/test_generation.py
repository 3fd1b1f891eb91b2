"""Decoding from the model average of K weight samples (tfb_core.generation)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tiny import prompts
from tfb_core import generation
from tfb_core.generation import (DecodeBatch, EagerDecoder, GenSequence, SamplingParams, StepResult, TokenInfo, apply,
                                 choose_tokens, generate, sample_tokens, sequence_mutual_information,
                                 text_decoder, update_finish)
from tfb_core.sampling import row_std, standard_normal
from tfb_core.uncertainty import entropy

SIGMA = 0.5


@pytest.fixture()
def post(llama_post):
    return llama_post




def sample_model(base_dir, post, seed: int, k: int, sigma: float):
    """An ordinary model whose weights ARE weight sample k: W0 + s * B'(A' + E_k), merged."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in post.layers:
            z = standard_normal(seed, k, layer.index, layer.lora_A.shape).double()
            a = layer.lora_A.double() + row_std(layer.d.double(), sigma)[:, None] * z
            delta = layer.scaling * layer.lora_B.double() @ a  # (out, in)
            target = model.get_submodule(layer.name)
            target.weight += delta.to(target.weight.dtype)
    return model


def test_sigma0_k1_greedy_equals_peft_generate(llama_dir, lora_dir, post):
    base, lora = llama_dir, lora_dir
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).eval()
    ps = prompts(post.tokenizer)
    out = generate(post, ps, SamplingParams(max_tokens=10, num_samples=1, ignore_eos=True))
    for p, seq in zip(ps, out):
        expected = ref.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert seq.token_ids == expected


def test_k_sample_decoding_equals_k_separate_models(llama_dir, lora_dir, post):
    """The batched engine against K plain models (merged weights), averaged by hand."""
    base = llama_dir
    post.sigma = SIGMA
    K, seed, steps = 3, 7, 6
    p = prompts(post.tokenizer)[1]
    got = generate(post, [p], SamplingParams(max_tokens=steps, num_samples=K, weight_seed=seed,
                                             ignore_eos=True))[0]
    models = [sample_model(base, post, seed, k, SIGMA) for k in range(K)]
    ids = list(p)
    for t in range(steps):
        with torch.no_grad():
            pk = torch.stack([torch.softmax(m(torch.tensor([ids])).logits[0, -1].double(), -1)
                              for m in models])  # (K, V), a full forward each: no cache
        avg = pk.mean(0)
        token = int(avg.argmax())
        info = got.tokens[t]
        assert info.token_id == token
        assert info.logprob == pytest.approx(math.log(avg[token]), abs=1e-4)
        pe, ee = entropy(avg).item(), entropy(pk).mean().item()
        assert info.predictive_entropy == pytest.approx(pe, abs=1e-4)
        assert info.expected_entropy == pytest.approx(ee, abs=1e-4)
        assert info.mutual_information == pytest.approx(pe - ee, abs=1e-4)
        # each sample's own log-probability of the emitted token
        assert info.sample_logprobs == pytest.approx(torch.log(pk[:, token]).tolist(), abs=1e-4)
        ids.append(token)
    assert any(t.mutual_information > 1e-3 for t in got.tokens)  # the samples do differ
    # the sequence's own MI: the samples' log-likelihoods of the whole text, from the explicit models
    L = torch.tensor([t.sample_logprobs for t in got.tokens], dtype=torch.float64).sum(0)
    assert got.summary()["sequence_mutual_information"] == pytest.approx(
        float(torch.log(torch.exp(L).mean()) - L.mean()), abs=1e-6)


def test_sequence_mutual_information_hand_computed():
    """K = 3 samples, two tokens: per-sample log-likelihoods L = (log .5 + log .4, log .2 + log .5,
    log .9 + log .1) = log (.2, .1, .09); MI = log(mean p) - mean log p."""
    rows = [(math.log(0.5), math.log(0.2), math.log(0.9)), (math.log(0.4), math.log(0.5), math.log(0.1))]
    p = [0.2, 0.1, 0.09]
    expected = math.log(sum(p) / 3) - sum(math.log(x) for x in p) / 3
    assert sequence_mutual_information(rows) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.0664, abs=1e-4)
    assert sequence_mutual_information([(math.log(0.3),) * 3] * 2) == pytest.approx(0.0, abs=1e-12)
    assert sequence_mutual_information([]) == 0.0


def test_joining_between_steps_gives_each_sequence_its_own_tokens(post):
    """Continuous batching: a sequence that joins a running batch decodes as it would alone."""
    post.sigma = SIGMA
    tok = post.tokenizer
    ps = prompts(tok)
    params = [SamplingParams(max_tokens=8, num_samples=2, ignore_eos=True),
              SamplingParams(max_tokens=3, num_samples=4, weight_seed=5, ignore_eos=True),
              SamplingParams(max_tokens=6, num_samples=1, ignore_eos=True)]
    alone = [generate(post, [p], sp)[0].token_ids for p, sp in zip(ps, params)]

    seqs = [GenSequence(list(p), sp, id=i) for i, (p, sp) in enumerate(zip(ps, params))]
    batch, first = DecodeBatch.prefill(post, seqs[:1])
    apply(post, first)
    batch.step()
    joining, first = DecodeBatch.prefill(post, seqs[1:])
    apply(post, first)
    batch = DecodeBatch.concatenate([batch, joining])
    while batch.seqs:
        batch.step()
        batch.filter()
    assert [s.token_ids for s in seqs] == alone
    assert [len(s.tokens) for s in seqs] == [8, 3, 6]
    assert all(s.finish_reason == "length" for s in seqs)


def test_stop_strings_end_the_text_and_are_not_emitted(post):
    tok = post.tokenizer
    p = prompts(tok)[0]
    free = generate(post, [p], SamplingParams(max_tokens=8, num_samples=1, ignore_eos=True))[0]
    assert len(free.text) > 3
    stop = free.text[2:4]
    seq = generate(post, [p], SamplingParams(max_tokens=8, num_samples=1, stop=[stop], ignore_eos=True))[0]
    assert seq.finish_reason == "stop"
    assert seq.text == free.text[: free.text.find(stop)]
    assert stop not in seq.text


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_min_tokens_keeps_the_end_token_out_and_ignore_eos_runs_past_it(post, monkeypatch, temperature):
    """The model's first greedy token made its end-of-sequence token: it ends the text at once;
    with ``ignore_eos`` the text goes on past it; with ``min_tokens`` it is never chosen before
    that many tokens (sampled too), while each token's logprob stays the model average's own."""
    tok = post.tokenizer
    p = prompts(tok)[0]
    eos = generate(post, [p], SamplingParams(max_tokens=1, num_samples=2, weight_seed=1))[0].token_ids[0]
    monkeypatch.setattr(post.model.generation_config, "eos_token_id", eos)
    params = dict(max_tokens=6, num_samples=2, weight_seed=1, temperature=temperature, seed=5)
    ended = generate(post, [p], SamplingParams(**{**params, "temperature": 0.0}))[0]
    assert ended.token_ids == [eos] and ended.finish_reason == "stop"
    past = generate(post, [p], SamplingParams(**{**params, "temperature": 0.0}, ignore_eos=True))[0]
    assert past.token_ids[0] == eos and len(past.tokens) == 6 and past.finish_reason == "length"
    kept = generate(post, [p], SamplingParams(**params, min_tokens=4))[0]
    assert eos not in kept.token_ids[:4] and len(kept.tokens) >= 4
    first = kept.tokens[0]  # its uncertainty and logprob are the average's, the end token's mass included
    assert first.predictive_entropy == pytest.approx(ended.tokens[0].predictive_entropy, abs=1e-5)
    if temperature == 0.0:  # the second most probable token, and its probability under the unmasked average
        top = generate(post, [p], SamplingParams(max_tokens=1, num_samples=2, weight_seed=1, top_logprobs=2))[0]
        assert (first.token_id, first.logprob) == pytest.approx(top.tokens[0].top[1], abs=1e-5)


def test_min_tokens_holds_back_a_stop_string(post):
    tok = post.tokenizer
    p = prompts(tok)[0]
    free = generate(post, [p], SamplingParams(max_tokens=8, num_samples=1, ignore_eos=True))[0]
    stop = tok.decode(free.token_ids[1:2])  # the second token's text
    early = generate(post, [p], SamplingParams(max_tokens=8, num_samples=1, stop=[stop], ignore_eos=True))[0]
    assert len(early.tokens) <= 2 and early.finish_reason == "stop"
    late = generate(post, [p], SamplingParams(max_tokens=8, num_samples=1, stop=[stop], ignore_eos=True,
                                              min_tokens=5))[0]
    assert late.token_ids[:5] == free.token_ids[:5] and len(late.tokens) >= 5


@pytest.mark.parametrize("text", ["Plain words, then more words.", "naïve café — 日本語 🌊🚢 mixed\nlines",
                                  "🙂🙂🙂 emoji only", "  spaces   and\ttabs  "])
def test_incremental_text_equals_decoding_the_whole_sequence(tok, text):
    """Token by token, the text grows to tokenizer.decode(all tokens) (the emoji's bytes span
    several tokens: no half character is ever shown), whatever the stop strings."""
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    s = GenSequence([1], SamplingParams(max_tokens=len(ids), ignore_eos=True))
    for i, t in enumerate(ids):
        s.tokens.append(TokenInfo(t, 0.0, 0.0, 0.0, 0.0))
        update_finish(text_decoder(tok), s, eos=set(), limit=None)
        whole = tok.decode(ids[:i + 1], skip_special_tokens=True)
        assert whole.startswith(s.text) and "\ufffd" not in s.text[:-1]
    assert s.finish_reason == "length" and s.text == tok.decode(ids, skip_special_tokens=True)


def test_tokens_that_show_nothing_do_not_grow_the_decoding_window(tok):
    """Special tokens (decoded to nothing) after the text, as with ignore_eos: the text stays
    whole and each token decodes a window of at most 9 tokens, not the whole tail."""
    ids = tok("Some text", add_special_tokens=False).input_ids + [tok.eos_token_id] * 200 + \
        tok(" and more", add_special_tokens=False).input_ids
    s = GenSequence([1], SamplingParams(max_tokens=len(ids), ignore_eos=True))
    widest = 0
    for t in ids:
        s.tokens.append(TokenInfo(t, 0.0, 0.0, 0.0, 0.0))
        widest = max(widest, len(s.tokens) - s.prefix_offset)
        update_finish(text_decoder(tok), s, eos={tok.eos_token_id}, limit=None)
    assert s.text == tok.decode(ids, skip_special_tokens=True) == "Some text and more"
    assert widest <= 10


def test_a_failed_admit_of_the_eager_engine_changes_no_sequence(post, monkeypatch):
    post.sigma = SIGMA
    ps = prompts(post.tokenizer)
    dec = EagerDecoder(post)
    dec.admit([GenSequence(ps[0], SamplingParams(max_tokens=4, num_samples=2, seed=3, temperature=1.0))])
    new = GenSequence(ps[1], SamplingParams(max_tokens=4, num_samples=2, seed=5, temperature=1.0))

    def boom(batches):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(DecodeBatch, "concatenate", staticmethod(boom))
    with pytest.raises(torch.OutOfMemoryError):
        dec.admit([new])
    assert not new.tokens and new.text == "" and new.generator is None and len(dec.seqs) == 1
    monkeypatch.undo()
    dec.admit([new])  # the retry gives it the token it gets alone
    assert new.token_ids[:1] == generate(post, [ps[1]], new.params)[0].token_ids[:1]


def test_a_stop_string_across_tokens_ends_the_text_where_it_starts(tok):
    text = "one two three four five six"
    ids = tok(text, add_special_tokens=False).input_ids
    s = GenSequence([1], SamplingParams(max_tokens=50, stop=["ee fo", "xyz"]))
    for t in ids:
        s.tokens.append(TokenInfo(t, 0.0, 0.0, 0.0, 0.0))
        update_finish(text_decoder(tok), s, eos={tok.eos_token_id}, limit=None)
        if s.finished:
            break
    assert s.finish_reason == "stop" and s.text == "one two thr"


def test_safe_text_holds_back_a_possible_stop_prefix():
    s = GenSequence([1], SamplingParams(stop=["END"]))
    s.text = "hello EN"
    assert s.safe_text() == "hello "
    s.text = "hello E!"
    assert s.safe_text() == "hello E!"


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k(post):
    p = prompts(post.tokenizer)[0]
    sp = SamplingParams(max_tokens=6, num_samples=2, temperature=1.0, top_k=5, seed=123, ignore_eos=True,
                        top_logprobs=5)
    a = generate(post, [p], sp)[0]
    b = generate(post, [p], copy.deepcopy(sp))[0]
    assert a.token_ids == b.token_ids
    for info in a.tokens:  # the chosen token is among the top 5 of the model average
        assert info.token_id in [t for t, _ in info.top]


def test_bad_sampling_params_are_rejected():
    from tfb_core.errors import TFBError

    with pytest.raises(TFBError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(TFBError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(TFBError, match="num_samples"):
        SamplingParams(num_samples=0)
    with pytest.raises(TFBError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(TFBError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


def expected_draw(p, T, top_k, top_p):
    """What one draw of tfb's sampler should follow, computed independently (numpy, float64)."""
    import numpy as np

    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(p, dtype=np.float64)) / T
    if top_k:
        logits[logits < np.sort(logits)[::-1][top_k - 1]] = -np.inf
    q = np.exp(logits - logits.max())
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    cum = np.cumsum(q[order])
    q[order[(cum - q[order]) >= top_p]] = 0.0
    return q / q.sum()


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.7)])
def test_batched_sampling_follows_the_tempered_truncated_distribution(T, top_k, top_p):
    """20,000 rows drawn in ONE batched call: each token's frequency is within 4.5 standard
    errors of its probability under softmax(log p / T) after top-k and top-p (numpy); a token
    outside the kept set is never drawn; greedy rows in the same batch take the argmax."""
    from tfb_core.generation import sample_tokens

    p = torch.tensor([0.30, 0.22, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.01, 0.0], dtype=torch.float64)
    q = torch.tensor(expected_draw(p.numpy(), T, top_k, top_p))
    n = 20_000
    torch.manual_seed(0)
    params = [SamplingParams(temperature=T, top_k=top_k, top_p=top_p)] * n + [SamplingParams(temperature=0)] * 3
    drawn = sample_tokens(p.expand(n + 3, -1).float(), params, [None] * (n + 3))
    assert drawn[n:].tolist() == [0, 0, 0]
    freq = torch.bincount(drawn[:n], minlength=len(p)).double() / n
    assert (freq[q == 0] == 0).all()
    assert ((freq - q).abs() <= 4.5 * (q * (1 - q) / n).sqrt() + 1e-12).all(), (freq, q)


def test_seeded_rows_are_reproducible_and_independent_of_their_batch():
    """A row's draws depend on its own generator only: the same seed gives the same tokens
    alone or among other rows; two seeds give different streams."""
    from tfb_core.generation import sample_tokens

    p = torch.softmax(torch.randn(1000, generator=torch.Generator().manual_seed(3)), -1)
    sp = SamplingParams(temperature=1.0, top_p=0.95)

    def draws(seed, others):
        g = torch.Generator().manual_seed(seed)
        rows = [g] + [None] * others
        return [int(sample_tokens(p.expand(1 + others, -1), [sp] * (1 + others), rows)[0]) for _ in range(30)]

    assert draws(5, 0) == draws(5, 7)
    assert draws(5, 0) != draws(6, 0)


def test_sampling_at_a_tiny_temperature_is_the_argmax_not_nan(post, tok):
    """Sampling is in log space (``log p / T``): at T = 0.001 every ``p ** (1 / T)`` underflows
    to 0 and the old sampler divided 0 by 0; now it is the greedy token."""
    p = torch.softmax(torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3, -1)[None]
    for T in (1e-3, 1e-6):
        params = SamplingParams(temperature=T)
        assert int(sample_tokens(p, [params], [torch.Generator().manual_seed(1)])[0]) == int(p.argmax())
        assert int(sample_tokens(p, [SamplingParams(temperature=T, top_k=3, top_p=0.5)], [None])[0]) == int(p.argmax())
    post.sigma = SIGMA
    greedy = generate(post, prompts(tok), SamplingParams(max_tokens=5, temperature=0, num_samples=3))
    tiny_t = generate(post, prompts(tok), SamplingParams(max_tokens=5, temperature=1e-3, seed=7, num_samples=3))
    assert [s.token_ids for s in tiny_t] == [s.token_ids for s in greedy]


def test_a_sequence_with_a_non_finite_distribution_ends_alone(post, tok):
    """One sequence's rows give NaN logits: it finishes with "error"; the others in the same
    step get exactly the tokens they get without it."""
    post.sigma = SIGMA
    seqs = [GenSequence(tok("a b").input_ids, SamplingParams(num_samples=2, temperature=t, seed=3))
            for t in (0, 0.8, 0.8)]
    logits = torch.randn(6, post.model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    poisoned = logits.clone()
    poisoned[2:4] = float("nan")  # the second sequence's two rows
    clean = copy.deepcopy(seqs)
    apply(post, StepResult(clean, choose_tokens(post, clean, logits)[1]))
    apply(post, StepResult(seqs, choose_tokens(post, seqs, poisoned)[1]))
    assert seqs[1].finish_reason == "error" and "not finite" in seqs[1].error and seqs[1].tokens == []
    for i in (0, 2):
        assert seqs[i].finish_reason == clean[i].finish_reason
        assert seqs[i].token_ids == clean[i].token_ids


@pytest.mark.parametrize("engine", ["eager", "static"])
@pytest.mark.parametrize("transient", [True, False])
def test_a_failed_step_changes_nothing_and_each_sequence_is_rerun_alone(post, tok, engine, transient):
    """A decode step that raises leaves the batch as it was (KV cache, rows, tokens, sampling
    generators); ``step_each`` then steps each sequence alone. A fault that does not come back
    changes no token of any sequence (seeded sampling included); one that comes back for one
    sequence's rows ends that sequence alone ("error", its exception kept), the others as without it."""
    from tfb_core.cuda_decode import StaticDecoder

    post.sigma = SIGMA
    ps = prompts(tok)
    params = [SamplingParams(max_tokens=6, temperature=0, num_samples=2),
              SamplingParams(max_tokens=6, temperature=0.9, seed=3, num_samples=3),
              SamplingParams(max_tokens=6, temperature=0, num_samples=2)]

    def run():
        seqs = [GenSequence(list(p), sp) for p, sp in zip(ps, params)]
        batch = StaticDecoder(post, graph=False) if engine == "static" else EagerDecoder(post)
        batch.admit(seqs)
        batch.filter()
        while batch.seqs:
            try:
                batch.step()
            except RuntimeError:
                batch.step_each()
            batch.filter()
        return seqs

    want = run()
    # sequence 1's third decode step feeds this position; no other sequence's step does
    at = len(ps[1]) + 2
    assert all(len(p) + 5 < at or len(p) > at for p in (ps[0], ps[2]))
    faults = []

    def hook(module, args, kwargs):
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions.shape[-1] == 1 and (positions == at).any() and not (transient and faults):
            faults.append(positions.numel())
            raise RuntimeError("kernel fault")

    handle = post.model.model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = run()
    finally:
        handle.remove()
    assert faults and faults[0] == sum(sp.num_samples for sp in params)  # the shared step failed first
    for i in (0, 2):
        assert got[i].token_ids == want[i].token_ids and got[i].finish_reason == want[i].finish_reason
    if transient:
        assert got[1].token_ids == want[1].token_ids and got[1].failure is None
    else:
        assert faults[1] == params[1].num_samples  # rerun alone, it failed again
        assert got[1].finish_reason == "error" and isinstance(got[1].failure, RuntimeError)
        assert got[1].token_ids == want[1].token_ids[:3]  # the prefill's token and two steps'


def snapshot(s: GenSequence) -> tuple:
    """Everything a step may commit to ``s``, by value."""
    state = s.generator.get_state() if s.generator is not None else None
    allowed = s.constraint.allowed() if s.constraint is not None else None
    return (copy.deepcopy(s.tokens), s.text, s.finish_reason, s.error, s.failure, s.prefix_offset, s.read_offset,
            None if state is None else state.tolist(), s.constraint, None if allowed is None else allowed.tolist())


@pytest.mark.parametrize("at", ["admit", "step"])
@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_step_whose_token_choice_raises_changes_no_sequence(post, tok, engine, at, monkeypatch):
    """The forward and the token choice run before anything is committed: when the choice
    raises late (after the draw, while it records the tokens), every sequence's tokens, text,
    detokenizer offsets, finish, sampling generator and grammar are exactly as before (at an
    admit: no generator and no grammar state made, no sequence admitted), and the next try gives
    the tokens of a run that never failed."""
    from tfb_core.cuda_decode import StaticDecoder
    from tfb_core.structured import json_grammar

    post.sigma = SIGMA
    ps = prompts(tok)
    params = [SamplingParams(max_tokens=6, temperature=0.9, seed=3, num_samples=2, ignore_eos=True),
              SamplingParams(max_tokens=6, num_samples=3, grammar=json_grammar(None)),
              SamplingParams(max_tokens=6, temperature=0.7, seed=8, num_samples=1, stop=["zz"], ignore_eos=True)]

    def boom(*args):
        raise RuntimeError("recording the token failed")

    def failing(dec, call, seqs):
        before = [snapshot(s) for s in seqs]
        with monkeypatch.context() as m:
            m.setattr(generation, "TokenInfo", boom)
            with pytest.raises(RuntimeError, match="recording"):
                call()
        assert [snapshot(s) for s in seqs] == before

    def run(fail: bool) -> list[GenSequence]:
        seqs = [GenSequence(list(p), sp) for p, sp in zip(ps, params)]
        dec = StaticDecoder(post, graph=False) if engine == "static" else EagerDecoder(post)
        if fail and at == "admit":
            failing(dec, lambda: dec.admit(seqs), seqs)
            assert not dec.seqs and dec.kv_rows == 0
        dec.admit(seqs)
        for step in range(4):
            if fail and at == "step" and step == 2:
                failing(dec, dec.step, seqs)
            dec.step()
        return seqs

    want, got = run(False), run(True)
    assert all(s.generator is not None for s in (want[0], want[2]))  # the failure met sampling generators
    assert want[1].constraint is not None and len(want[1].tokens) > 2  # and a grammar under way
    assert [snapshot(s)[:4] for s in got] == [snapshot(s)[:4] for s in want]
