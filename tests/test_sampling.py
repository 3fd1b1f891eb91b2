"""tfb_core.sampling: K weight samples in one batched forward equal K explicit-weight models.

The reference for sample k is a plain copy of the base model whose weights are
``W0 + s * B'(A' + E_k)`` (conftest.explicit_model): no TFB layer, no batching, no padding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import explicit_model, fresh_base, left_pad

from tfb_core.posterior import Posterior
from tfb_core.sampling import draw_seed, row_std, standard_normal

SIGMA = 0.05
SEED = 11
K = 3
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog", "One two three four five"]


@pytest.fixture(scope="module")
def reference(post, llama_dir, lora_dir):
    """For each k < K: the logits of each prompt alone through the explicit model k."""
    seqs = [post.tokenizer(t).input_ids for t in TEXTS]
    out = {}
    with torch.no_grad():
        for k in range(K):
            model = explicit_model(llama_dir, post, SEED, k, SIGMA, adapter_dir=lora_dir)
            out[k] = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
    return seqs, out


def test_standard_normal_is_reproducible_and_distinct():
    a = standard_normal(1, 2, 3, (4, 64))
    assert a.dtype == torch.float32 and a.shape == (4, 64)
    assert torch.equal(a, standard_normal(1, 2, 3, (4, 64)))
    for other in ((2, 2, 3), (1, 3, 3), (1, 2, 4)):
        assert not torch.allclose(a, standard_normal(*other, (4, 64)))
    assert 0 <= draw_seed(1, 2, 3) < 2 ** 63
    z = standard_normal(0, 0, 0, (200_000,))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_row_std():
    d = torch.tensor([4.0, 2.0, 1.0, 0.0])
    assert torch.equal(row_std(d, 0.5), torch.tensor([0.125, 0.25, 0.5, 0.0]))
    assert torch.equal(row_std(d, 0.0), torch.zeros(4))


def test_k_batched_forward_equals_explicit_weights(post, reference):
    """One padded forward over prompts x K rows == K independent unpadded forwards."""
    seqs, ref = reference
    ids, mask, pos = left_pad(seqs)
    with torch.no_grad(), post.samples(num_samples=K, seed=SEED, sigma=SIGMA):
        logits = post.model(input_ids=ids.repeat_interleave(K, 0), attention_mask=mask.repeat_interleave(K, 0),
                            position_ids=pos.repeat_interleave(K, 0)).logits
    T = ids.shape[1]
    worst = 0.0
    for b, s in enumerate(seqs):
        for k in range(K):
            got = logits[b * K + k, T - len(s):]
            worst = max(worst, (got - ref[k][b]).abs().max().item())
    assert worst < 1e-5
    # the samples differ from one another (the test is not vacuous)
    assert (ref[0][1] - ref[1][1]).abs().max().item() > 1e-3


def test_mixed_samples_equal_explicit_weights(post, reference):
    """Any row -> (seed, k) map: rows of one batch with samples in any order."""
    seqs, ref = reference
    rows = [(0, 2), (1, 0), (2, 1), (1, 2), (0, 0)]  # (prompt, k)
    samples = [(SEED, 2), (SEED, 0), (SEED, 1), (99, 5)]  # an unused sample too
    slot_of = {k: samples.index((SEED, k)) for k in range(K)}
    ids, mask, pos = left_pad([seqs[b] for b, _ in rows])
    slots = torch.tensor([slot_of[k] for _, k in rows])
    with torch.no_grad(), post.mixed_samples(samples, slots, sigma=SIGMA):
        logits = post.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    T = ids.shape[1]
    for row, (b, k) in enumerate(rows):
        got = logits[row, T - len(seqs[b]):]
        assert (got - ref[k][b]).abs().max().item() < 1e-5, (b, k)


def test_mixed_samples_one_token_per_row_equal_explicit_weights(post, reference):
    """One token per row (the shape of a decode step, where every sample's noise term is one
    GEMM and each row keeps its own): the same logits as the explicit models."""
    seqs, ref = reference
    rows = [(0, 2), (1, 0), (2, 1), (1, 2), (0, 0), (2, 2)]  # (prompt, k)
    samples = [(99, 5), (SEED, 1), (SEED, 0), (SEED, 2)]
    slots = torch.tensor([samples.index((SEED, k)) for _, k in rows])
    ids = torch.tensor([[seqs[b][0]] for b, _ in rows])
    with torch.no_grad(), post.mixed_samples(samples, slots, sigma=SIGMA):
        logits = post.model(input_ids=ids).logits
    for row, (b, k) in enumerate(rows):
        assert (logits[row, 0] - ref[k][b][0]).abs().max().item() < 1e-5, (b, k)
    assert (ref[0][0][0] - ref[2][0][0]).abs().max().item() > 1e-3  # the samples differ


def test_sample_k_does_not_depend_on_k_total(post):
    ids = torch.tensor([post.tokenizer(TEXTS[1]).input_ids])
    with torch.no_grad():
        with post.samples(num_samples=3, seed=SEED, sigma=SIGMA):
            noise3 = [layer.noise.clone() for layer in post.layers]
            out3 = post.model(input_ids=ids.repeat_interleave(3, 0)).logits
        with post.samples(num_samples=5, seed=SEED, sigma=SIGMA):
            noise5 = [layer.noise.clone() for layer in post.layers]
            out5 = post.model(input_ids=ids.repeat_interleave(5, 0)).logits
    for a, b in zip(noise3, noise5):
        assert torch.equal(a, b[:3])
    assert (out3[2] - out5[2]).abs().max().item() < 1e-5
    # and the layers are left clean
    assert all(layer.noise is None and layer.slots is None for layer in post.layers)


def test_sigma_rescales_the_same_draws(post):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    layer = next(l for l in post.layers if l.name.endswith("q_proj"))
    with torch.no_grad():
        mean = layer(x)
        with post.samples(num_samples=2, seed=SEED, sigma=SIGMA):
            n1 = [l.noise.clone() for l in post.layers]
            y1 = layer(x)
        with post.samples(num_samples=2, seed=SEED, sigma=2 * SIGMA):
            n2 = [l.noise.clone() for l in post.layers]
            y2 = layer(x)
    for a, b in zip(n1, n2):
        assert torch.allclose(b, 2 * a, rtol=1e-6, atol=0)
    # the layer's output is linear in the noise: (y(2 sigma) - mean) == 2 (y(sigma) - mean)
    assert torch.allclose(y2 - mean, 2 * (y1 - mean), rtol=1e-4, atol=1e-6)
    assert (y1 - mean).abs().max().item() > 1e-4


def test_sigma_zero_runs_no_noise(post):
    with post.samples(num_samples=4, seed=SEED, sigma=0.0):
        assert all(layer.noise is None for layer in post.layers)


def test_gpt2_conv1d_k_batched_equals_explicit(gpt2_dir, gpt2_lora_dir):
    post = Posterior.from_adapter(fresh_base(gpt2_dir), gpt2_lora_dir)
    assert {l.name.rsplit(".", 1)[-1] for l in post.layers} == {"c_attn", "c_fc"}
    seqs = [post.tokenizer(t).input_ids for t in TEXTS[:2]]
    ids, mask, pos = left_pad(seqs)
    k_total = 2
    with torch.no_grad(), post.samples(num_samples=k_total, seed=SEED, sigma=SIGMA):
        logits = post.model(input_ids=ids.repeat_interleave(k_total, 0),
                            attention_mask=mask.repeat_interleave(k_total, 0),
                            position_ids=pos.repeat_interleave(k_total, 0)).logits
    T = ids.shape[1]
    with torch.no_grad():
        for k in range(k_total):
            model = explicit_model(gpt2_dir, post, SEED, k, SIGMA, adapter_dir=gpt2_lora_dir)
            for b, s in enumerate(seqs):
                ref = model(input_ids=torch.tensor([s])).logits[0]
                assert (logits[b * k_total + k, T - len(s):] - ref).abs().max().item() < 1e-5


def test_one_forward_reads_each_base_layer_once(post):
    """K samples are rows of one batch: every base layer runs once over prompts x K rows."""
    calls = []
    handles = [layer.base_layer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
               for layer in post.layers]
    try:
        ids = torch.tensor([post.tokenizer(TEXTS[2]).input_ids] * 2)
        with torch.no_grad(), post.samples(num_samples=4, seed=SEED, sigma=SIGMA):
            post.model(input_ids=ids.repeat_interleave(4, 0))
    finally:
        for h in handles:
            h.remove()
    assert calls == [8] * len(post.layers)


def test_draws_survive_cache_eviction_and_errors(post):
    """More samples than the draw cache holds: evicted draws come back identical."""
    with post.samples(num_samples=3, seed=SEED, sigma=SIGMA):
        first = [layer.noise.clone() for layer in post.layers]
    with post.samples(num_samples=100, seed=SEED + 1, sigma=SIGMA):  # evicts (SEED, 0..2)
        pass
    assert (SEED, 0) not in post.draws
    with post.samples(num_samples=3, seed=SEED, sigma=SIGMA):
        again = [layer.noise.clone() for layer in post.layers]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(RuntimeError, match="boom"):
        with post.samples(num_samples=3, seed=SEED, sigma=SIGMA):
            raise RuntimeError("boom")
    assert all(layer.noise is None and layer.slots is None for layer in post.layers)
