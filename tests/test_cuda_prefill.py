"""tfb_core.cuda_prefill: the CUDA scoring forward gives choice_probs' eager answers.

On this CPU the forward runs eagerly (no CUDA graph); it is the code a graph captures on a GPU,
so letter and sequence scoring, left padding, mixed K and weight seeds, sigma 0 and the LRU of
weight-sample slots are all checked against the eager HF forward of ``choice_probs``.
"""

from __future__ import annotations

import pytest
import torch

from tfb_core.cuda_prefill import PrefillEngine
from tfb_core.data import MCItem
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior
from tfb_core.encoding import encode_item
from tfb_core.options import Mode
from tfb_core.scoring import choice_probs


@pytest.fixture()
def post(llama_post):
    return llama_post


def items(tok, mode):
    qs = [MCItem(["Paris", "Rome", "Berlin"], question="What is the capital of France?"),
          MCItem(["4", "five", "22", "none of these"], question="2 + 2 ="),
          MCItem(["blue", "green"], question="The sky on a clear day is")]
    return [encode_item(tok, q, mode) for q in qs]


def same(ref, got):
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", [Mode.LETTER, Mode.SEQUENCE])
@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_same_probabilities_as_the_eager_forward(post, mode, sigma):
    post.sigma = sigma
    enc = items(post.tokenizer, mode)
    samples = [(0, 4), (3, 2), (0, 4)]  # mixed K and weight seeds: a row -> sample map
    engine = PrefillEngine(post)
    ref = choice_probs(post, enc, samples)
    same(ref, choice_probs(post, enc, samples, engine=engine))
    if sigma > 0:  # the samples differ
        assert max(float(p.std(0).max()) for p in ref) > 1e-4
    regular = [(1, 3)] * 3
    same(choice_probs(post, enc, regular), choice_probs(post, enc, regular, engine=engine))


def test_sample_slots_are_reused_and_evicted_least_recently_used(post):
    post.sigma = 0.5
    enc = items(post.tokenizer, Mode.LETTER)[:1]
    engine = PrefillEngine(post)
    for seed in range(6):  # 6 x 8 samples through 16 slots: old ones are evicted
        got = choice_probs(post, enc, [(seed, 8)], engine=engine)
        same(choice_probs(post, enc, [(seed, 8)]), got)
    assert engine.noise[0].shape[0] == 16 and len(engine.slot_of) == 16
    assert set(engine.slot_of) == {(s, k) for s in (4, 5) for k in range(8)}
    big = choice_probs(post, enc, [(9, 20)], engine=engine)  # more samples than slots: grows
    assert engine.noise[0].shape[0] == 32
    same(choice_probs(post, enc, [(9, 20)]), big)


def test_the_variance_search_sigma_runs_eagerly(post):
    """An explicit sigma (the search's) is not what the engine's buffers hold: eager path."""
    post.sigma = 0.5
    enc = items(post.tokenizer, Mode.LETTER)
    engine = PrefillEngine(post)
    got = choice_probs(post, enc, [(0, 3)] * 3, sigma=0.1, engine=engine)
    same(choice_probs(post, enc, [(0, 3)] * 3, sigma=0.1), got)
    assert not engine.slot_of  # the engine was not used


def test_other_model_types_are_refused(gpt2_dir, gpt2_lora_dir):
    post = Posterior.from_adapter(load_base_model(gpt2_dir, dtype="float32"), gpt2_lora_dir)
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        PrefillEngine(post)


def test_a_failed_noise_write_leaves_no_half_written_slot(post, monkeypatch):
    """Out of memory while writing a sample's noise (after some layers): that sample gets no
    slot, and the retry scores with the right weights."""
    import tfb_core.cuda_llama as cp  # where the engines write a sample's noise

    post.sigma = 0.5
    enc = items(post.tokenizer, Mode.LETTER)[:1]
    engine = PrefillEngine(post)
    choice_probs(post, enc, [(7, 4)], engine=engine)  # slots now hold seed 7's samples
    real, calls = cp.sample_noise, []

    def flaky(p, buffers, slot, key, sigma):
        calls.append(key)
        if len(calls) == 2:  # the second new sample: some layers written, then out of memory
            buffers[0][slot].zero_()
            raise torch.OutOfMemoryError("CUDA out of memory")
        real(p, buffers, slot, key, sigma)

    monkeypatch.setattr(cp, "sample_noise", flaky)
    with pytest.raises(torch.OutOfMemoryError):
        choice_probs(post, enc, [(8, 4)], engine=engine)
    assert (8, 1) not in engine.slot_of
    monkeypatch.undo()
    same(choice_probs(post, enc, [(8, 4)]), choice_probs(post, enc, [(8, 4)], engine=engine))


def test_a_shape_is_graphed_from_its_second_forward_and_within_the_byte_budget(post):
    engine = PrefillEngine(post, graph_tokens=1024, graph_bytes=64 * post.model.config.vocab_size * 4 * 8)
    assert not engine.wants_graph(4, 64, 1)  # first sight: eager, no capture cost
    assert engine.wants_graph(4, 64, 1)  # second: graphed
    assert not engine.wants_graph(32, 64, 1) and not engine.wants_graph(32, 64, 1)  # over graph_tokens
    assert not engine.wants_graph(2, 128, 100) and not engine.wants_graph(2, 128, 100)  # logits too big
