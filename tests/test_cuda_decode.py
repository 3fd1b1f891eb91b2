"""tfb_core.cuda_decode: the static-cache decoder gives the eager engine's tokens and uncertainty.

On this CPU the step runs eagerly (no CUDA graph); it is the code a CUDA graph captures on a
GPU, so tokens, per-token uncertainty, continuous batching (admits mid-flight, rows packed when
sequences leave, buffers growing) and the row -> weight-sample map are all checked here
against :func:`tfb_core.generation.generate` (the eager ``DecodeBatch``).
"""

from __future__ import annotations

import pytest
import torch

from tiny import prompts
from tfb_core.cuda_decode import StaticDecoder
from tfb_core.cuda_llama import is_supported
from tfb_core.errors import TFBError
from tfb_core.engines import make_decoder, resolve_engine
from tfb_core.generation import DecodeBatch, EagerDecoder, GenSequence, SamplingParams, apply, generate
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior


@pytest.fixture()
def post(llama_post):
    return llama_post


def admitted(post, seqs: list[GenSequence], **kwargs) -> StaticDecoder:
    """A new decoder with ``seqs`` admitted."""
    dec = StaticDecoder(post, **kwargs)
    dec.admit(seqs)
    return dec




def assert_same(ref, got):
    for r, f in zip(ref, got, strict=True):
        assert f.token_ids == r.token_ids
        assert f.finish_reason == r.finish_reason
        assert f.text == r.text
        for a, b in zip(r.tokens, f.tokens, strict=True):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert b.predictive_entropy == pytest.approx(a.predictive_entropy, abs=1e-4)
            assert b.expected_entropy == pytest.approx(a.expected_entropy, abs=1e-4)
            assert b.mutual_information == pytest.approx(a.mutual_information, abs=1e-4)
            assert [t for t, _ in b.top] == [t for t, _ in a.top]


@pytest.mark.parametrize("K,sigma", [(1, 0.0), (4, 0.5)])
def test_same_tokens_and_uncertainty_as_generate(post, K, sigma):
    post.sigma = sigma
    ps = prompts(post.tokenizer)
    params = SamplingParams(max_tokens=12, num_samples=K, ignore_eos=True, weight_seed=3)
    ref = generate(post, ps, params)
    got = generate(post, ps, params, make_decoder(post, "static"))
    assert all(len(s.tokens) == 12 for s in got)
    assert_same(ref, got)
    if sigma > 0:  # the samples really differ: some token carries mutual information
        assert max(t.mutual_information for s in got for t in s.tokens) > 1e-6


def test_mixed_samples_sampling_stops_and_top_logprobs(post):
    """Different K, weight seeds, temperatures (seeded), top_logprobs, lengths and a stop string
    in one batch: every sequence as the eager engine makes it."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    ref0 = generate(post, ps[:1], SamplingParams(max_tokens=8, num_samples=3, ignore_eos=True))
    stop = post.tokenizer.decode(ref0[0].token_ids[3:5])  # a string the first sequence emits
    params = [SamplingParams(max_tokens=8, num_samples=3, ignore_eos=True, stop=[stop], top_logprobs=3),
              SamplingParams(max_tokens=6, num_samples=2, weight_seed=7, temperature=0.9, seed=11),
              SamplingParams(max_tokens=10, num_samples=5, weight_seed=1, top_k=20, temperature=1.2, seed=5)]
    ref = generate(post, ps, params)
    got = generate(post, ps, params, make_decoder(post, "static"))
    assert_same(ref, got)
    assert ref[0].finish_reason == "stop" and len(ref[0].tokens) < 8


def test_joins_mid_flight_and_growth_match_each_sequence_alone(post):
    """Sequences join a running decoder at different steps (growing its rows, columns and noise
    slots past their first size), others leave early; each one's tokens equal decoding it alone."""
    post.sigma = 0.5
    tok = post.tokenizer
    texts = ["Hello", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", "Once upon"]
    lengths = [3, 9, 40, 7]  # the third needs more columns than the first join reserved
    seqs = [GenSequence(tok(t).input_ids, SamplingParams(max_tokens=n, num_samples=2 + i, weight_seed=i,
                                                         ignore_eos=True))
            for i, (t, n) in enumerate(zip(texts, lengths))]
    alone = [generate(post, [s.prompt_ids], s.params)[0] for s in seqs]
    dec = admitted(post, seqs[:1], bucket=16)
    first = (dec.rows_cap, dec.length, dec.samples_cap)
    joins = {2: seqs[1:3], 4: seqs[3:]}
    for step in range(60):
        if step in joins:
            dec.admit(joins[step])
        dec.filter()
        if not dec.seqs and step > max(joins):
            break
        dec.step()
    assert dec.kv_rows == 0 and not dec.seqs
    assert (dec.rows_cap, dec.length, dec.samples_cap) > first  # the buffers grew on the way
    assert_same(alone, seqs)


def test_noise_slots_are_reused_after_sequences_leave(post):
    post.sigma = 0.5
    dec = StaticDecoder(post)
    ids = post.tokenizer("Hi there").input_ids
    for seed in range(5):  # one sequence at a time, each with its own weight seed
        s = GenSequence(ids, SamplingParams(max_tokens=2, num_samples=4, weight_seed=seed, ignore_eos=True))
        dec.admit([s])
        dec.step()
        assert dec.filter() == [s]
        ref = generate(post, [ids], s.params)[0]
        assert s.token_ids == ref.token_ids
    assert dec.samples_cap == 4  # 4 samples in use at a time: no growth past that


def test_rows_past_the_active_ones_do_not_disturb_them(post):
    """Capacity 5 rows; once the K=2 sequence leaves, 3 rows run in a bucket of 4: the spare row
    attends to its column 0 only, never NaN."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    seqs = [GenSequence(ps[0], SamplingParams(max_tokens=20, num_samples=3, ignore_eos=True)),
            GenSequence(ps[1], SamplingParams(max_tokens=2, num_samples=2, ignore_eos=True))]
    dec = admitted(post, seqs)
    assert dec.rows_cap == 5  # exactly the K KV caches asked for
    for _ in range(18):
        dec.step()
        dec.filter()
    assert dec.rows_cap == 5 and dec.kv_rows == 3
    assert torch.isfinite(dec.bias[3:, 0]).all() and int(dec.col[3]) < dec.length
    dec.step()
    assert_same(generate(post, ps[:1], seqs[0].params), seqs[:1])


def test_other_model_types_fall_back_to_the_eager_engine(gpt2_dir, gpt2_lora_dir):
    post = Posterior.from_adapter(load_base_model(gpt2_dir, dtype="float32"), gpt2_lora_dir)
    assert not is_supported(post.model)
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        StaticDecoder(post)
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        make_decoder(post, "static")
    assert resolve_engine(post) == "eager" and isinstance(make_decoder(post), EagerDecoder)
    ids = [post.tokenizer("Hello world").input_ids]
    params = SamplingParams(max_tokens=4, num_samples=2, ignore_eos=True)
    assert [s.token_ids for s in generate(post, ids, params, make_decoder(post))] == \
        [s.token_ids for s in generate(post, ids, params)]


def test_sequences_finished_at_prefill_are_handed_back_by_the_next_filter(post):
    """max_tokens=1 with K=16: the first token ends it; the next filter hands it back and frees
    its rows, the other sequence decodes on as alone."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    done = GenSequence(ps[0], SamplingParams(max_tokens=1, num_samples=16, ignore_eos=True))
    live = GenSequence(ps[1], SamplingParams(max_tokens=4, num_samples=2, ignore_eos=True))
    dec = admitted(post, [done, live])
    assert done.finish_reason == "length" and dec.kv_rows == 18
    assert dec.filter() == [done] and dec.seqs == [live] and dec.kv_rows == 2
    while dec.seqs:
        dec.step()
        dec.filter()
    assert_same(generate(post, ps[:2], [done.params, live.params]), [done, live])


def test_an_idle_decoder_gives_back_what_a_long_request_grew(post):
    """After a long (and wide) request has left, the next small admit does not inherit its
    buffers: rows, columns and so the attention width shrink back."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    long = GenSequence(ps[0], SamplingParams(max_tokens=300, num_samples=8, ignore_eos=True))
    dec = admitted(post, [long])
    assert dec.length >= 300 and dec.rows_cap == 8
    long.finish_reason = "cancelled"
    dec.filter()
    short = GenSequence(ps[1], SamplingParams(max_tokens=5, num_samples=2, ignore_eos=True))
    dec.admit([short])
    assert dec.length == 64 and dec.rows_cap == 2
    while dec.seqs:
        dec.step()
        dec.filter()
    assert_same(generate(post, ps[1:2], short.params), [short])


def test_similar_sizes_keep_the_buffers_and_a_failed_admit_changes_nothing(post, monkeypatch):
    """Requests of K=4 and K=1 in turn reuse one allocation (no shrink below 4x); an admit that
    runs out of memory while growing leaves the decoder as it was, with nothing to hand back."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    dec = StaticDecoder(post)
    for K in (4, 1, 4, 1):
        s = GenSequence(ps[0], SamplingParams(max_tokens=3, num_samples=K, ignore_eos=True))
        dec.admit([s])
        buffers = dec.kc[0]
        while dec.seqs:
            dec.step()
            dec.filter()
    assert dec.rows_cap == 4 and dec.kc[0] is buffers

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(dec, "_reserve", oom)
    done = GenSequence(ps[1], SamplingParams(max_tokens=1, num_samples=2))
    big = GenSequence(ps[2], SamplingParams(max_tokens=5, num_samples=16))
    with pytest.raises(torch.OutOfMemoryError):
        dec.admit([done, big])
    assert dec.filter() == [] and dec.kv_rows == 0 and not dec.seqs and not done.tokens and not big.tokens


@pytest.mark.parametrize("through", ["own forward", "prefill engine"])
def test_admit_prefills_into_the_cache_as_the_eager_prefill_does(post, through):
    """The decoder's prefill (its own forward, or the scoring engine's with keys and values
    copied in) writes the same keys and values (at every real column), the same next positions
    and first tokens as the eager prefill (its ``DynamicCache``, mask, positions and tokens)."""
    from tfb_core.cuda_prefill import PrefillEngine

    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    params = [SamplingParams(max_tokens=6, num_samples=3, weight_seed=2, ignore_eos=True),
              SamplingParams(max_tokens=4, num_samples=2, weight_seed=5, ignore_eos=True)]
    engine = PrefillEngine(post) if through == "prefill engine" else None
    a = admitted(post, [GenSequence(list(p), sp) for p, sp in zip(ps, params)], prefill=engine)
    b, first = DecodeBatch.prefill(post, [GenSequence(list(p), sp) for p, sp in zip(ps, params)])
    apply(post, first)
    T = b.mask.shape[1]
    real = b.mask.bool()  # (rows, T)
    assert a.n == len(real) and torch.equal(a.bias[:a.n, :T] == 0, real) and not (a.bias[:a.n, T:] == 0).any()
    for i, layer in enumerate(b.cache.layers):
        assert torch.allclose(a.kc[i][:a.n, :, :T].transpose(1, 2)[real], layer.keys.transpose(1, 2)[real], atol=1e-5)
        assert torch.allclose(a.vc[i][:a.n, :, :T].transpose(1, 2)[real], layer.values.transpose(1, 2)[real], atol=1e-5)
    assert (a.col[:a.n] == T).all()
    assert torch.equal(a.pos[:a.n], b.positions) and torch.equal(a.tok[:a.n], b.last)
    assert_same(b.seqs, a.seqs)


def test_a_failed_admit_leaves_the_running_sequences_as_they_were(post):
    """An admit that raises (an empty prompt among the new ones; a forward that fails) changes
    nothing: the running sequence decodes on exactly as alone, the new ones have no token."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    live = GenSequence(ps[0], SamplingParams(max_tokens=6, num_samples=2, ignore_eos=True))
    dec = admitted(post, [live])
    dec.step()
    bad = [GenSequence(ps[1], SamplingParams(max_tokens=3, num_samples=4)), GenSequence([], SamplingParams())]
    with pytest.raises(TFBError, match="empty"):
        dec.admit(bad)
    failing = GenSequence(ps[1], SamplingParams(max_tokens=3, num_samples=4))

    def boom(*a, **k):
        raise RuntimeError("forward failed")

    dec._prefill = boom
    with pytest.raises(RuntimeError):
        dec.admit([failing])
    del dec._prefill
    assert dec.seqs == [live] and dec.kv_rows == 2 and not failing.tokens and not bad[0].tokens
    while dec.seqs:
        dec.step()
        dec.filter()
    assert_same(generate(post, ps[:1], live.params), [live])


def test_a_weight_sample_keeps_its_noise_after_its_sequences_leave(post, monkeypatch):
    """Requests with the posterior's weight seed one after another: the second writes no noise
    (the first's samples kept their slots); a new seed takes the room of samples no active
    sequence uses, never of one in use; and every sequence decodes as alone."""
    import tfb_core.cuda_llama as cl

    post.sigma = 0.5
    writes = []
    real = cl.sample_noise
    monkeypatch.setattr(cl, "sample_noise", lambda p, b, slot, key, sigma: (writes.append(key), real(p, b, slot, key, sigma)))
    ps = prompts(post.tokenizer)
    dec = StaticDecoder(post)
    first = GenSequence(ps[0], SamplingParams(max_tokens=3, num_samples=4, weight_seed=0, ignore_eos=True))
    again = GenSequence(ps[1], SamplingParams(max_tokens=3, num_samples=4, weight_seed=0, ignore_eos=True))
    for s in (first, again):
        dec.admit([s])
        while dec.seqs:
            dec.step()
            dec.filter()
    assert writes == [(0, k) for k in range(4)]  # once, for the first request only
    long = GenSequence(ps[0], SamplingParams(max_tokens=8, num_samples=2, weight_seed=0, ignore_eos=True))
    other = GenSequence(ps[2], SamplingParams(max_tokens=3, num_samples=4, weight_seed=9, ignore_eos=True))
    dec.admit([long])
    dec.step()
    dec.admit([other])  # needs 4 slots: 2 are held by `long`, so the buffers grow or evict (0, 2), (0, 3)
    assert {dec.slot_of[(0, 0)], dec.slot_of[(0, 1)]}.isdisjoint({dec.slot_of[(9, k)] for k in range(4)})
    while dec.seqs:
        dec.step()
        dec.filter()
    alone = [generate(post, [s.prompt_ids], s.params)[0] for s in (first, again, long, other)]
    assert_same(alone, [first, again, long, other])


def test_an_idle_decoder_keeps_a_wide_burst_s_rows_but_not_at_a_new_length(post):
    """After a wide burst leaves, a narrow request of the same length reuses the buffers (and
    so a GPU's captured graphs); one that needs more columns gets buffers of its own size,
    not the burst's rows at the new length."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    dec = StaticDecoder(post)
    dec.admit([GenSequence(ps[0], SamplingParams(max_tokens=5, num_samples=16, ignore_eos=True))])
    buffers, wide = dec.kc[0], dec.rows_cap
    while dec.seqs:
        dec.step()
        dec.filter()
    narrow = GenSequence(ps[1], SamplingParams(max_tokens=5, num_samples=1, ignore_eos=True))
    dec.admit([narrow])
    assert dec.kc[0] is buffers and dec.rows_cap == wide == 16
    while dec.seqs:
        dec.step()
        dec.filter()
    long = GenSequence(ps[1], SamplingParams(max_tokens=200, num_samples=1, ignore_eos=True))
    dec.admit([long])
    assert dec.rows_cap == 1 and dec.length >= 200
    while dec.seqs:
        dec.step()
        dec.filter()
    assert_same([generate(post, [s.prompt_ids], s.params)[0] for s in (narrow, long)], [narrow, long])


def test_an_idle_decoder_gives_back_a_burst_of_weight_seeds_noise_slots(post):
    """After requests with many weight seeds leave, a request with one seed does not step over
    their noise slots (every slot costs each step time): past KEPT_SLOTS (64) the slots shrink
    back to its need."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    dec = StaticDecoder(post)
    burst = [GenSequence(ps[i % 3], SamplingParams(max_tokens=2, num_samples=2, weight_seed=i, ignore_eos=True))
             for i in range(40)]
    dec.admit(burst)
    assert dec.samples_cap == 128  # 80 samples
    while dec.seqs:
        dec.step()
        dec.filter()
    one = GenSequence(ps[1], SamplingParams(max_tokens=4, num_samples=2, weight_seed=5, ignore_eos=True))
    dec.admit([one])
    assert dec.samples_cap == 2
    while dec.seqs:
        dec.step()
        dec.filter()
    assert_same([generate(post, [s.prompt_ids], s.params)[0] for s in burst[:3] + [one]], burst[:3] + [one])


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_sequence_whose_cache_went_nan_leaves_no_nan_for_the_next_in_its_rows(post, when):
    """A sequence whose forward made NaN (its keys and values too: at prefill, or at a decode
    step) ends with an error while another runs on; the next sequence prefilled into its rows
    with a shorter prompt never reads the NaN columns past its own (0 x NaN is NaN in the
    attention's weighted sum): both decode as alone."""
    post.sigma = 0.5
    tok = post.tokenizer
    nan_id = tok(" quokka", add_special_tokens=False).input_ids[-1]
    hook = post.model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: out.masked_fill((args[0] == nan_id)[..., None], float("nan")))
    words = "one two three four five six seven eight nine ten" + (" quokka" if when == "prefill" else "")
    other = GenSequence(tok("The capital of France is").input_ids,
                        SamplingParams(max_tokens=12, num_samples=2, ignore_eos=True))
    long = GenSequence(tok(words).input_ids, SamplingParams(max_tokens=4, num_samples=2, ignore_eos=True))
    short = GenSequence(tok("Hi").input_ids, SamplingParams(max_tokens=6, num_samples=2, ignore_eos=True))
    try:
        alone = [generate(post, [s.prompt_ids], s.params)[0] for s in (other, short)]
        dec = admitted(post, [other, long])
        if when == "decode":
            dec.tok[2:4] = nan_id  # its rows are fed the poisoned token: its next keys and values are NaN
            dec.step()
        assert dec.filter() == [long] and long.finish_reason == "error"
        dec.admit([short])  # into the rows the NaN sequence held
        while dec.seqs:
            dec.step()
            dec.filter()
    finally:
        hook.remove()
    assert [s.finish_reason for s in (other, short)] == ["length", "length"], (other.error, short.error)
    assert_same(alone, [other, short])


def test_a_decoder_made_before_sigma_changed_refuses_to_run(post):
    """Its noise buffers hold the old sigma's draws: a silent sigma-0 run would report MI 0."""
    old = post.sigma
    try:
        post.sigma = 0.0
        decoder = make_decoder(post, "static")
        post.sigma = 0.05
        with pytest.raises(TFBError, match="sigma changed from 0 to 0.05"):
            generate(post, [[1, 2, 3]], SamplingParams(max_tokens=2, num_samples=2), decoder)
    finally:
        post.sigma = old


def test_graphed_row_counts_are_powers_of_two_then_multiples_of_64():
    from tfb_core.cuda_llama import graph_rows

    assert [graph_rows(n) for n in (0, 1, 3, 33, 64, 65, 130, 640, 641)] == [1, 1, 4, 64, 64, 128, 192, 640, 704]
