"""The static engines on a GPU, with their CUDA graphs, against the eager ones.

``tests/test_cuda_decode.py`` and ``tests/test_cuda_prefill.py`` run the static engines' code
eagerly on the CPU; here the same comparisons run where the engines are meant to run: on
CUDA, with the decode step and the scoring forward replayed from captured CUDA graphs.
Skipped without CUDA; run on a GPU machine with ``pytest -m cuda tests/test_cuda_engines.py``.

- decode: :class:`~tfb_core.cuda_decode.StaticDecoder` (graphed) gives the tokens, logprobs
  and per-token uncertainty of :func:`~tfb_core.generation.generate` (the eager
  ``DecodeBatch``), for mixed K, weight seeds, sampling and sequences joining mid-flight;
- scoring: :class:`~tfb_core.cuda_prefill.PrefillEngine` (graphed from a shape's second
  forward) gives :func:`~tfb_core.scoring.choice_probs`' eager probabilities in letter and
  sequence mode;
- isolation: a sequence that went NaN leaves nothing in its graphed KV rows for the next.

float32 is compared tightly (the same maths in another kernel order); bfloat16 more loosely,
and by probabilities rather than by tokens (a near tie may round either way).
"""

from __future__ import annotations

import pytest
import torch

import tiny
from tfb_core.data import MCItem
from tfb_core.generation import GenSequence, SamplingParams, generate
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior
from tfb_core.encoding import encode_item
from tfb_core.options import Mode
from tfb_core.scoring import choice_probs

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIGMA = 0.5
ATOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny Llama wider than the CPU tests' (GQA, 4 layers) and its LoRA on every projection."""
    root = tmp_path_factory.mktemp("cuda")
    base = tiny.make_llama(root / "base", layers=4, hidden=128)
    lora = tiny.make_lora(base, root / "lora", targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"))
    return base, lora


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def post(request, dirs):
    base, lora = dirs
    p = Posterior.from_adapter(load_base_model(base, device="cuda", dtype=request.param), lora)
    p.sigma = SIGMA
    return p


def prompts(tok):
    return [tok("The capital of France is").input_ids,
            tok("Once upon a time, in a land far away, there lived").input_ids,
            tok("1 2 3").input_ids]


def decode_in_rounds(post, prompts_, params, rounds: int = 3):
    """The same prompts admitted ``rounds`` times into one StaticDecoder whose prefill is a
    PrefillEngine (the server's layout), each round decoded to the end: (decoder, engine, the
    rounds' sequences)."""
    from tfb_core.cuda_decode import StaticDecoder
    from tfb_core.cuda_prefill import PrefillEngine

    engine = PrefillEngine(post)
    dec = StaticDecoder(post, prefill=engine)
    done = [[GenSequence(list(p), params) for p in prompts_] for _ in range(rounds)]
    for seqs in done:
        dec.admit(seqs)
        while dec.seqs:
            dec.filter()
            if dec.seqs:
                dec.step()
    return dec, engine, done


def assert_same_generation(ref, got, dtype):
    atol = ATOL[dtype]
    for r, g in zip(ref, got, strict=True):
        if dtype == torch.float32:
            assert g.token_ids == r.token_ids and g.finish_reason == r.finish_reason
        steps = min(len(r.tokens), len(g.tokens))
        for a, b in zip(r.tokens[:steps], g.tokens[:steps]):
            if a.token_id != b.token_id:
                break  # bf16: a near tie went the other way; later steps see different text
            assert b.logprob == pytest.approx(a.logprob, abs=atol)
            assert b.predictive_entropy == pytest.approx(a.predictive_entropy, abs=atol)
            assert b.mutual_information == pytest.approx(a.mutual_information, abs=atol)


def test_graphed_decode_matches_the_eager_engine(post):
    from tfb_core.cuda_decode import StaticDecoder

    dtype = next(post.model.parameters()).dtype
    ps = prompts(post.tokenizer)
    params = [SamplingParams(max_tokens=24, num_samples=4, ignore_eos=True, weight_seed=3, top_logprobs=2),
              SamplingParams(max_tokens=16, num_samples=2, ignore_eos=True, weight_seed=7, temperature=0.9,
                             seed=11),
              SamplingParams(max_tokens=30, num_samples=8, ignore_eos=True, weight_seed=1, top_k=20, seed=5)]
    alone = [generate(post, [p], sp)[0] for p, sp in zip(ps, params)]
    seqs = [GenSequence(list(p), sp, id=i) for i, (p, sp) in enumerate(zip(ps, params))]
    dec = StaticDecoder(post)
    dec.admit(seqs[:1])
    for step in range(80):  # the others join mid-flight, growing rows and noise slots
        if step == 3:  # prefilled by the decoder's own forward (the first by the eager engine)
            dec.admit(seqs[1:])
        dec.filter()
        if not dec.seqs and step > 3:
            break
        dec.step()
    assert dec.graphs, f"no CUDA graph was captured ({dec.capture_error})"
    assert dec.kv_rows == 0
    assert_same_generation(alone, seqs, dtype)  # each as the eager engine decodes it alone
    assert max(t.mutual_information for s in seqs for t in s.tokens) > 1e-6  # the samples differ


def test_graphed_scoring_matches_the_eager_forward(post):
    from tfb_core.cuda_prefill import PrefillEngine

    dtype = next(post.model.parameters()).dtype
    questions = [MCItem(["Paris", "Rome", "Berlin"], question="What is the capital of France?"),
                 MCItem(["4", "five", "22", "none of these"], question="2 + 2 ="),
                 MCItem(["blue", "green"], question="The sky on a clear day is")]
    engine = PrefillEngine(post)
    for mode in (Mode.LETTER, Mode.SEQUENCE):
        enc = [encode_item(post.tokenizer, q, mode) for q in questions]
        samples = [(0, 4), (3, 2), (0, 8)]  # mixed K and weight seeds
        ref = choice_probs(post, enc, samples)
        for _ in range(3):  # a shape runs eagerly once, then from its graph
            got = choice_probs(post, enc, samples, engine=engine)
            for r, g in zip(ref, got, strict=True):
                torch.testing.assert_close(g, r, atol=ATOL[dtype], rtol=0)
        assert max(float(p.std(0).max()) for p in ref) > 1e-4  # the samples differ
    assert engine.graphs, f"no CUDA graph was captured ({engine.capture_error})"


def test_admit_through_the_graphed_prefill_engine_matches_the_eager_engine(post):
    """New sequences prefilled by the scoring engine (graphed from a shape's second sight, keys
    and values copied into the decoder's rows) decode as the eager engine decodes them alone."""
    dtype = next(post.model.parameters()).dtype
    ps = prompts(post.tokenizer)
    params = SamplingParams(max_tokens=12, num_samples=4, ignore_eos=True, weight_seed=3)
    dec, engine, rounds = decode_in_rounds(post, ps, params)  # the same shapes thrice
    assert any(key[-1] for key in engine.graphs), f"no prefill graph with keys and values ({engine.capture_error})"
    alone = [generate(post, [p], params)[0] for p in ps]
    for seqs in rounds:
        assert_same_generation(alone, seqs, dtype)


def test_a_nan_sequence_s_graphed_rows_leave_no_nan_for_the_next_in_them(post):
    """On the graphed decoder (through the graphed prefill engine): a sequence fed a NaN token
    at a decode step ends with an error while another runs on; a shorter prompt admitted into
    its rows decodes as alone (its rows were zeroed in place, under the captured graphs)."""
    from tfb_core.cuda_decode import StaticDecoder
    from tfb_core.cuda_prefill import PrefillEngine

    dtype = next(post.model.parameters()).dtype
    tok = post.tokenizer
    nan_id = tok(" quokka", add_special_tokens=False).input_ids[-1]
    other = GenSequence(tok("The capital of France is").input_ids,
                        SamplingParams(max_tokens=12, num_samples=2, ignore_eos=True))
    long = GenSequence(tok("one two three four five six seven eight nine ten").input_ids,
                       SamplingParams(max_tokens=6, num_samples=2, ignore_eos=True))
    short = GenSequence(tok("Hi").input_ids, SamplingParams(max_tokens=8, num_samples=2, ignore_eos=True))
    alone = [generate(post, [s.prompt_ids], s.params)[0] for s in (other, short)]
    hook = post.model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: out.masked_fill((args[0] == nan_id)[..., None], float("nan")))
    try:
        dec = StaticDecoder(post, prefill=PrefillEngine(post))
        dec.admit([other, long])
        dec.step()  # captures the graph for 4 rows
        dec.tok[2:4] = nan_id  # the long sequence's rows are fed the poisoned token
        dec.step()
        assert dec.filter() == [long] and long.finish_reason == "error"
        dec.admit([short])
        while dec.seqs:
            dec.step()
            dec.filter()
    finally:
        hook.remove()
    assert dec.graphs, f"no CUDA graph was captured ({dec.capture_error})"
    assert [s.finish_reason for s in (other, short)] == ["length", "length"], (other.error, short.error)
    assert_same_generation(alone, [other, short], dtype)
