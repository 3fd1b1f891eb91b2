"""tfb_core.scoring: letter and sequence modes against plain, unpadded, one-at-a-time forwards.

References: an explicit-weight model per weight sample (conftest.explicit_model) or peft on the
original adapter (sigma = 0), one prompt at a time with no padding; log-probs summed here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import explicit_model, fresh_base, mc_items, paper_prompt, peft_model, ref_letter, ref_sequence

from tfb_core.data import MCItem
from tfb_core.errors import TFBError
from tfb_core.posterior import Posterior
from tfb_core.encoding import encode_item
from tfb_core.scoring import choice_probs, predict, score_items, score_prompts, target_log_probs
from tfb_core.uncertainty import decompose

SIGMA = 0.05
SEED = 3
K = 2


@pytest.fixture(scope="module")
def explicit(post, llama_dir, lora_dir):
    """Plain models with the weights of samples k = 0..K-1 (seed SEED, sigma SIGMA)."""
    return [explicit_model(llama_dir, post, SEED, k, SIGMA, adapter_dir=lora_dir) for k in range(K)]


@pytest.fixture(scope="module")
def items():
    return mc_items(5, seed=1)


# --- letter mode ----------------------------------------------------------------------------------


def test_letter_prompt_and_single_token_labels(tok, items):
    for item in items:
        enc = encode_item(tok, item, "letter")
        text = paper_prompt(item)
        assert enc.sequences == [tok(text).input_ids]
        labels = enc.targets[0]
        assert len(labels) == len(item.choices) == enc.num_choices
        for i, label in enumerate(labels):
            assert tok.decode([label]).strip() == "ABCD"[i]
            assert tok(text + " " + "ABCD"[i]).input_ids == enc.sequences[0] + [label]


def test_a_letter_prompt_past_the_context_is_refused_before_its_labels_are_tokenized(tok):
    """The labels are found by tokenizing the prompt again once per label (27 times with 26
    choices): a prompt that cannot fit is refused after the first."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return tok(*args, **kwargs)

    item = MCItem(choices=[f"choice {i} " * 50 for i in range(26)], question="Which?")
    with pytest.raises(TFBError, match="the prompt is .* tokens long; the model's context is 100 tokens"):
        encode_item(counting, item, "letter", max_length=100)
    assert len(calls) == 1


def test_letter_labels_after_a_chat_prompt(tok, items):
    enc = encode_item(tok, items[0], "letter", chat=True)
    text = tok.apply_chat_template([{"role": "user", "content": paper_prompt(items[0])}],
                                   tokenize=False, add_generation_prompt=True)
    assert enc.sequences == [tok(text, add_special_tokens=False).input_ids]
    for i, label in enumerate(enc.targets[0]):
        # the label as the model would emit it after this prompt: one token, space or not
        assert tok.decode([label]).strip() == "ABCD"[i]
        ids = tok(text + tok.decode([label]), add_special_tokens=False).input_ids
        assert ids == enc.sequences[0] + [label]


def test_letter_sigma_zero_equals_peft(post, llama_dir, lora_dir, items):
    ref = peft_model(llama_dir, lora_dir)
    got = score_items(post, items, "letter", num_samples=1, seed=0, sigma=0.0)
    assert got.shape == (len(items), 1, 4)
    for i, item in enumerate(items):
        assert (got[i, 0].double() - ref_letter(ref, post.tokenizer, item)).abs().max().item() < 1e-5


def test_letter_samples_equal_explicit_weights(post, explicit, items):
    got = score_items(post, items, "letter", num_samples=K, seed=SEED, sigma=SIGMA, batch_size=3)
    assert got.shape == (len(items), K, 4)
    assert torch.allclose(got.sum(-1), torch.ones(len(items), K), atol=1e-5)
    for i, item in enumerate(items):
        for k in range(K):
            ref = ref_letter(explicit[k], post.tokenizer, item)
            assert (got[i, k].double() - ref).abs().max().item() < 1e-5, (i, k)
    assert (got[:, 0] - got[:, 1]).abs().max().item() > 1e-4  # the samples differ


def test_padding_does_not_change_results(post, tok):
    short = MCItem(choices=["yes", "no"], question="Red?")
    long = [MCItem(choices=["a long answer here", "b"], question="word " * 40 + "?"),
            MCItem(choices=["x", "an even longer choice of words than that"], question="why " * 25 + "?")]
    for mode in ("letter", "sequence"):
        alone = choice_probs(post, [encode_item(tok, short, mode)], [(SEED, K)], SIGMA)[0]
        encs = [encode_item(tok, it, mode) for it in (long[0], short, long[1])]
        batched = choice_probs(post, encs, [(SEED, K)] * 3, SIGMA)[1]
        assert (alone - batched).abs().max().item() < 1e-5, mode


def test_batch_size_does_not_change_results(post, items):
    one = score_items(post, items, "sequence", num_samples=K, seed=SEED, sigma=SIGMA, batch_size=1)
    all_ = score_items(post, items, "sequence", num_samples=K, seed=SEED, sigma=SIGMA, batch_size=8)
    assert (one - all_).abs().max().item() < 1e-5


# --- sequence mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_sequence_equals_summed_log_probs(post, explicit, items, normalize):
    got = score_items(post, items, "sequence", num_samples=K, seed=SEED, sigma=SIGMA,
                      length_normalize=normalize)
    for i, item in enumerate(items):
        for k in range(K):
            ref = ref_sequence(explicit[k], post.tokenizer, item, normalize)
            assert (got[i, k].double() - ref).abs().max().item() < 1e-5, (i, k)


def test_sequence_sigma_zero_equals_peft(post, llama_dir, lora_dir, items):
    ref = peft_model(llama_dir, lora_dir)
    got = score_items(post, items[:3], "sequence", num_samples=1, sigma=0.0)
    for i, item in enumerate(items[:3]):
        assert (got[i, 0].double() - ref_sequence(ref, post.tokenizer, item)).abs().max().item() < 1e-5


# --- the log-probs that are computed ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 700, 1 << 24])  # logits per logsumexp chunk: < 1 row, ~1 row, all
def test_target_log_probs_equal_a_float64_log_softmax(dtype, chunk):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 3, 500, generator=gen) * 8).to(dtype)  # (rows, keep, V)
    wanted = [(torch.randint(0, 3, (n,), generator=gen).tolist(), torch.randint(0, 500, (n,), generator=gen).tolist())
              for n in (1, 4, 2, 3, 1, 5, 2)]
    ref = torch.log_softmax(logits.double(), -1)
    got = target_log_probs(logits, wanted, chunk_elements=chunk)
    assert len(got) == len(wanted)
    for b, ((pos, tok), lp) in enumerate(zip(wanted, got)):
        assert lp.dtype == torch.float64 and lp.shape == (len(tok),)
        torch.testing.assert_close(lp, ref[b, pos, tok], atol=2e-5, rtol=0)


def test_target_log_probs_allocate_no_full_float_copy():
    """bf16 logits: only a chunk is ever upcast; the largest new tensor is far below (rows, keep, V) float32."""
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(64, 4, 2000).to(torch.bfloat16)
    wanted = [([3, 3], [5, 7])] * 64
    full = logits.numel() * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        target_log_probs(logits, wanted, chunk_elements=8000)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= full // 16, (largest, full)


# --- mixed requests in one forward -----------------------------------------------------------------


def test_mixed_seeds_and_k_equal_each_item_alone(post, tok, items):
    encs = [encode_item(tok, items[0], "letter"), encode_item(tok, items[1], "sequence"),
            encode_item(tok, items[2], "letter"), encode_item(tok, items[3], "sequence", length_normalize=True)]
    samples = [(1, 2), (5, 3), (1, 4), (SEED, 1)]
    together = choice_probs(post, encs, samples, SIGMA)
    for enc, sample, got in zip(encs, samples, together):
        alone = choice_probs(post, [enc], [sample], SIGMA)[0]
        assert got.shape == alone.shape == (sample[1], enc.num_choices)
        assert (got - alone).abs().max().item() < 1e-5


def test_sample_k_is_the_same_whatever_k_total(post, tok, items):
    enc = encode_item(tok, items[0], "letter")
    three = choice_probs(post, [enc], [(7, 3)], SIGMA)[0]
    five = choice_probs(post, [enc], [(7, 5)], SIGMA)[0]
    assert (three - five[:3]).abs().max().item() < 1e-5
    other_seed = choice_probs(post, [enc], [(8, 3)], SIGMA)[0]
    assert (three - other_seed).abs().max().item() > 1e-5


def test_predict_is_the_model_average(post, items):
    sp = score_items(post, items, "letter", num_samples=3, seed=SEED, sigma=SIGMA)
    u = predict(post, items, mode="letter", num_samples=3, seed=SEED, sigma=SIGMA)
    ref = decompose(sp)
    assert torch.allclose(u.probs, sp.mean(1), atol=1e-6)
    assert torch.allclose(u.mutual_information, ref.mutual_information, atol=1e-6)
    assert torch.all(u.mutual_information > 0)


# --- GPT-2 (Conv1D) -----------------------------------------------------------------------------


def test_gpt2_letter_and_sequence(gpt2_dir, gpt2_lora_dir, items):
    post = Posterior.from_adapter(fresh_base(gpt2_dir), gpt2_lora_dir)
    ref = peft_model(gpt2_dir, gpt2_lora_dir)
    got = score_items(post, items[:3], "letter", num_samples=1, sigma=0.0)
    for i, item in enumerate(items[:3]):
        assert (got[i, 0].double() - ref_letter(ref, post.tokenizer, item)).abs().max().item() < 1e-5
    model = explicit_model(gpt2_dir, post, SEED, 1, SIGMA, adapter_dir=gpt2_lora_dir)
    got = score_items(post, items[:3], "sequence", num_samples=2, seed=SEED, sigma=SIGMA)
    for i, item in enumerate(items[:3]):
        assert (got[i, 1].double() - ref_sequence(model, post.tokenizer, item)).abs().max().item() < 1e-5


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_mode(post, tok, items):
    with pytest.raises(TFBError, match="unknown mode 'words'.*letter, sequence"):
        encode_item(tok, items[0], "words")
    with pytest.raises(TFBError, match="allowed: letter, sequence"):
        score_items(post, items, mode="bogus")


def test_too_many_choices_for_letters_and_mixed_counts(post, tok, items):
    many = MCItem(choices=[f"c{i}" for i in range(27)], question="?")
    with pytest.raises(TFBError, match="at most 26 choices"):
        encode_item(tok, many, "letter")
    two = MCItem(choices=["a", "b"], question="q?")
    mixed = score_items(post, [items[0], two], "letter", num_samples=2)
    alone = score_items(post, [two], "letter", num_samples=2)
    C = len(items[0].choices)
    assert mixed.shape == (2, 2, C)
    assert torch.equal(mixed[1, :, 2:], torch.zeros(2, C - 2))  # padded with probability 0
    torch.testing.assert_close(mixed[1, :, :2], alone[0], atol=1e-5, rtol=0)


def test_prompt_longer_than_the_context(post, tok):
    item = MCItem(choices=["a", "b"], question="word " * 600)
    with pytest.raises(TFBError, match="context is 512 tokens"):
        score_items(post, [item], "letter", num_samples=1)


@pytest.mark.parametrize("sigma", [0.0, SIGMA])
def test_shared_prefix_equals_one_row_per_choice(post, tok, sigma):
    """The prefix-sharing scorer (the default) against one full row per choice: letter and
    sequence items in one call, prompts and choices of different lengths (padding on both
    sides), mixed seeds and K, length-normalised or not."""
    items = mc_items(6, seed=4)
    items[1] = MCItem(choices=["a", "a much longer answer than the others", "b c"], question="q " * 9)
    encoded = [encode_item(tok, it, "sequence", length_normalize=i % 2 == 1) for i, it in enumerate(items[:4])]
    encoded += [encode_item(tok, it, "letter") for it in items[4:]]
    samples = [(SEED, 3), (0, 1), (SEED, 2), (7, 3), (SEED, 3), (0, 2)]
    shared = choice_probs(post, encoded, samples, sigma=sigma)
    full = choice_probs(post, encoded, samples, sigma=sigma, share_prefix=False)
    for a, b, (_, k) in zip(shared, full, samples):
        assert a.shape == b.shape == (k, a.shape[1])
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


# --- prompt scoring (teacher-forced, every token) -----------------------------------------------------


def test_prompt_scores_equal_explicit_weights_token_by_token(post, explicit, tok):
    """Each token after the first: log p under the mean of the K samples' softmax, PE, EE, MI
    and the samples' own log-probs, against one unpadded forward per explicit-weight sample."""
    ids = tok("The river runs north of the quiet stone city").input_ids
    got = score_prompts(post, [ids], [(SEED, K)], top_logprobs=3, sigma=SIGMA)[0]
    assert [t.token_id for t in got] == ids[1:]
    ref = torch.stack([torch.log_softmax(m(torch.tensor([ids])).logits[0, :-1].double(), -1) for m in explicit])
    p = ref.exp().mean(0)  # (L-1, V) the model average
    pe = -(p * p.log()).sum(-1)
    ee = -(ref.exp() * ref).sum(-1).mean(0)
    for t, info in enumerate(got):
        assert info.logprob == pytest.approx(p[t, ids[t + 1]].log().item(), abs=1e-5)
        assert info.sample_logprobs == pytest.approx(ref[:, t, ids[t + 1]].tolist(), abs=1e-5)
        assert info.predictive_entropy == pytest.approx(pe[t].item(), abs=1e-4)
        assert info.expected_entropy == pytest.approx(ee[t].item(), abs=1e-4)
        assert info.mutual_information == pytest.approx(max(pe[t].item() - ee[t].item(), 0), abs=1e-4)
        assert [i for i, _ in info.top] == p[t].topk(3).indices.tolist()
        assert [lp for _, lp in info.top] == pytest.approx(p[t].topk(3).values.log().tolist(), abs=1e-5)
    assert max(t.mutual_information for t in got) > 1e-6  # the samples differ


def test_prompt_scores_of_a_generated_text_are_what_generation_reported(llama_post, tok):
    from tfb_core.generation import SamplingParams, generate

    post = llama_post
    post.sigma = SIGMA
    prompt = tok("Seven red apples and").input_ids
    seq = generate(post, [prompt], SamplingParams(max_tokens=5, num_samples=K, weight_seed=SEED, top_logprobs=2))[0]
    scored = score_prompts(post, [prompt + seq.token_ids], [(SEED, K)], top_logprobs=2)[0][len(prompt) - 1:]
    for gen, got in zip(seq.tokens, scored, strict=True):
        assert got.token_id == gen.token_id
        for name in ("logprob", "predictive_entropy", "expected_entropy", "mutual_information"):
            assert getattr(got, name) == pytest.approx(getattr(gen, name), abs=1e-5), name
        assert got.sample_logprobs == pytest.approx(gen.sample_logprobs, abs=1e-5)
        assert [i for i, _ in got.top] == [i for i, _ in gen.top]
    assert max(t.mutual_information for t in scored) > 1e-6  # the samples differ


def test_prompt_scores_batched_with_mixed_seeds_and_lengths_equal_each_alone(post, tok):
    prompts = [tok("word " * 30).input_ids, tok("Red?").input_ids, tok("a b c d").input_ids, [42]]
    samples = [(1, 2), (5, 3), (1, 2), (SEED, 1)]
    together = score_prompts(post, prompts, samples, top_logprobs=1, sigma=SIGMA)
    assert together[3] == []  # one token: nothing predicts it
    for prompt, sample, got in zip(prompts, samples, together):
        alone = score_prompts(post, [prompt], [sample], top_logprobs=1, sigma=SIGMA)[0]
        assert len(got) == len(alone) == len(prompt) - 1
        for a, b in zip(got, alone):
            assert a.token_id == b.token_id and a.top[0][0] == b.top[0][0]
            assert a.sample_logprobs == pytest.approx(b.sample_logprobs, abs=1e-5)
            assert a.mutual_information == pytest.approx(b.mutual_information, abs=1e-5)


def test_prompt_scoring_bad_input(post):
    with pytest.raises(TFBError, match="one .seed, K. per prompt"):
        score_prompts(post, [[1, 2]], [])
    with pytest.raises(TFBError, match="at least one token"):
        score_prompts(post, [[]], [(0, 1)])
