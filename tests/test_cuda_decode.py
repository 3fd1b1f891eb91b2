"""tfb_core.cuda_decode: the static-cache, graph-ready decode step gives generate's tokens.

On this CPU the step runs eagerly (no CUDA graph); the code path is the one the graph
captures on a GPU, so the tokens and the per-token uncertainty are checked here.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from tfb_core.cuda_decode import FastDecoder, Unsupported, check_supported, generate_fast
from tfb_core.generation import GenSequence, SamplingParams, generate
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastdec")
    base = tiny.make_llama(root / "base")
    return base, tiny.make_lora(base, root / "lora")


@pytest.fixture()
def post(dirs):
    base, lora = dirs
    return Posterior.from_adapter(load_base_model(base, dtype="float32"), lora)


def prompts(tok):
    return [tok("The capital of France is").input_ids,
            tok("Once upon a time, in a land far away, there lived").input_ids,
            tok("1 2 3").input_ids]


def assert_same(ref, fast):
    for r, f in zip(ref, fast):
        assert f.token_ids == r.token_ids
        assert f.finish_reason == r.finish_reason
        assert f.text == r.text
        for a, b in zip(r.tokens, f.tokens):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert b.predictive_entropy == pytest.approx(a.predictive_entropy, abs=1e-4)
            assert b.expected_entropy == pytest.approx(a.expected_entropy, abs=1e-4)
            assert b.mutual_information == pytest.approx(a.mutual_information, abs=1e-4)


@pytest.mark.parametrize("K,sigma", [(1, 0.0), (4, 0.5)])
def test_same_tokens_and_uncertainty_as_generate(post, K, sigma):
    post.sigma = sigma
    ps = prompts(post.tokenizer)
    params = SamplingParams(max_tokens=12, num_samples=K, ignore_eos=True, weight_seed=3)
    ref = generate(post, ps, params)
    fast = generate_fast(post, ps, params, sync_every=5)
    assert all(len(s.tokens) == 12 for s in fast)
    assert_same(ref, fast)
    if sigma > 0:  # the samples really differ: some token carries mutual information
        assert max(t.mutual_information for s in fast for t in s.tokens) > 1e-6


def test_per_sequence_lengths_and_stops(post):
    """Different max_tokens and a stop string: each sequence stops where generate stops it."""
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    ref0 = generate(post, ps[:1], SamplingParams(max_tokens=8, num_samples=3, ignore_eos=True))
    stop = post.tokenizer.decode(ref0[0].token_ids[3:5])  # a string the first sequence emits
    params = [SamplingParams(max_tokens=8, num_samples=3, ignore_eos=True, stop=[stop]),
              SamplingParams(max_tokens=3, num_samples=3),
              SamplingParams(max_tokens=10, num_samples=3)]
    ref = generate(post, ps, params)
    fast = generate_fast(post, ps, params, sync_every=4)
    assert_same(ref, fast)
    assert ref[0].finish_reason == "stop" and len(ref[1].tokens) <= 3


def test_no_host_sync_state_and_room(post):
    post.sigma = 0.5
    ps = prompts(post.tokenizer)
    seqs = [GenSequence(p, SamplingParams(max_tokens=5, num_samples=2, ignore_eos=True)) for p in ps]
    dec = FastDecoder(post, seqs, graph=False)
    assert dec.room() == 4 and dec.length % 64 == 0
    for _ in range(4):
        dec.step()
    with pytest.raises(RuntimeError):
        dec.step()
    assert [len(t) for t in dec.finish_tokens()] == [5, 5, 5]


def test_unsupported_falls_back(post):
    ps = prompts(post.tokenizer)
    sampled = SamplingParams(max_tokens=4, num_samples=2, temperature=0.7, seed=1)
    with pytest.raises(Unsupported):
        check_supported(post, [GenSequence(ps[0], sampled)])
    mixed = [SamplingParams(max_tokens=4, num_samples=2), SamplingParams(max_tokens=4, num_samples=3)]
    with pytest.raises(Unsupported):
        check_supported(post, [GenSequence(p, sp) for p, sp in zip(ps, mixed)])
    out = generate_fast(post, ps[:2], mixed)  # through generate
    ref = generate(post, ps[:2], mixed)
    assert [s.token_ids for s in out] == [s.token_ids for s in ref]
