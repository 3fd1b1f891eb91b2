"""tfb_core.search: the returned sigma meets the criterion and the bracket point above it fails.

The criterion is recomputed here, from the per-sample choice probabilities (scoring is tested
against explicit-weight models in test_scoring.py), with the formulas of docs/method.md §4 written
independently: relative NLL change NOT divided by N; fraction of changed answers; accuracy drop.
"""

from __future__ import annotations

import math

import pytest
from conftest import fresh_base, mc_items

from tfb_core.errors import TFBError
from tfb_core.posterior import Posterior
from tfb_core.scoring import score_items
from tfb_core.search import search_sigma

K = 4
SEED = 0
SIGMA_INIT = 0.01
RTOL = 0.05


@pytest.fixture(scope="module")
def items():
    return mc_items(12, seed=2)


class Criterion:
    """The criterion of docs/method.md §4 at any sigma, computed independently of tfb_core.search."""

    def __init__(self, post, items, criterion, gold, mode="letter", num_samples=K):
        self.post, self.items, self.criterion, self.gold, self.mode = post, items, criterion, gold, mode
        self.num_samples = num_samples
        p0 = self.average(0.0, num_samples=1).tolist()
        if gold:
            self.targets = [it.answer for it in items]
        else:
            self.targets = [max(range(len(p)), key=p.__getitem__) for p in p0]
        self.nll0 = self.nll(p0)
        self.acc0 = self.acc(p0)

    def average(self, sigma, num_samples=None):
        num_samples = num_samples or self.num_samples
        sp = score_items(self.post, self.items, self.mode, num_samples=num_samples, seed=SEED, sigma=sigma)
        return sp.double().mean(1)  # (N, C): average probabilities over the K samples (float64 here,
        # float32 in tfb_core: values agree to ~1e-7)

    def nll(self, probs):
        return sum(-math.log(p[y]) for p, y in zip(probs, self.targets)) / len(self.targets)

    def acc(self, probs):
        return sum(max(range(len(p)), key=p.__getitem__) == y for p, y in zip(probs, self.targets)) / len(probs)

    def __call__(self, sigma):
        probs = self.average(sigma).tolist()
        if self.criterion == "nll":  # two-sided, as the paper states it
            return abs(self.nll(probs) - self.nll0) / self.nll0
        if self.gold:
            return self.acc0 - self.acc(probs)
        return 1.0 - self.acc(probs)  # fraction of answers that differ from the sigma = 0 ones


def check_search(post, items, criterion, gold, eps, **kwargs):
    result = search_sigma(post, items, criterion=criterion, eps=eps, num_samples=K, seed=SEED,
                          gold_labels=gold, sigma_init=SIGMA_INIT, rtol=RTOL, progress=False, **kwargs)
    assert result.criterion == criterion and result.eps == eps and result.gold_labels == gold
    ref = Criterion(post, items, criterion, gold)
    trace = result.trace
    sigmas = [p.sigma for p in trace]
    # bracket: sigma_init, doubled while feasible, then bisection inside the bracket
    assert sigmas[0] == SIGMA_INIT
    first_bad = next(i for i, p in enumerate(trace) if not p.feasible)
    assert sigmas[: first_bad + 1] == [SIGMA_INIT * 2 ** i for i in range(first_bad + 1)]
    # every point: the value recomputed independently, and its verdict
    for p in trace:
        value = ref(p.sigma)
        assert p.value == pytest.approx(value, abs=1e-6), p
        assert p.feasible == (value <= eps), p
    # the returned sigma is the largest feasible point, feasible when recomputed
    feasible = [p.sigma for p in trace if p.feasible]
    assert feasible, "the test needs a feasible point: lower SIGMA_INIT"
    assert result.sigma == max(feasible)
    assert ref(result.sigma) <= eps
    # the bracket's upper end, the next point above it, fails; and the bracket is narrow
    above = min(s for s in sigmas if s > result.sigma)
    assert ref(above) > eps
    assert (above - result.sigma) / above < RTOL
    return result


def test_nll_pseudo_labels(post, items):
    result = check_search(post, items, "nll", gold=False, eps=0.01)
    assert result.baseline_nll > 0 and result.mode == "letter" and result.num_samples == K


def test_accuracy_pseudo_labels(post, items):
    check_search(post, items, "accuracy", gold=False, eps=0.2)


def test_nll_gold_labels(post, items):
    check_search(post, items, "nll", gold=True, eps=0.01)


def test_accuracy_gold_labels(post, items):
    check_search(post, items, "accuracy", gold=True, eps=0.1)


def test_fixed_seed_is_deterministic(post, items):
    kwargs = dict(criterion="nll", eps=0.01, num_samples=K, seed=5, sigma_init=SIGMA_INIT, progress=False)
    a = search_sigma(post, items, **kwargs)
    b = search_sigma(post, items, **kwargs)
    assert a.sigma == b.sigma > 0
    assert a.trace == b.trace


def test_still_feasible_after_all_doublings(post, items):
    """A huge tolerance: the bracket never closes; the last (feasible) doubling is returned."""
    r = search_sigma(post, items, criterion="accuracy", eps=1.0, num_samples=2, sigma_init=SIGMA_INIT,
                     max_doublings=3, progress=False)
    assert [p.sigma for p in r.trace] == [0.01, 0.02, 0.04]
    assert all(p.feasible for p in r.trace) and r.sigma == 0.04


def test_sequence_mode_search(post, items):
    r = search_sigma(post, items[:6], criterion="nll", eps=0.01, num_samples=2, mode="sequence",
                     sigma_init=SIGMA_INIT, max_steps=3, progress=False)
    ref = Criterion(post, items[:6], "nll", gold=False, mode="sequence", num_samples=2)
    for p in r.trace:
        value = ref(p.sigma)
        assert p.value == pytest.approx(value, abs=1e-6) and p.feasible == (value <= 0.01)
    assert r.sigma == max([p.sigma for p in r.trace if p.feasible], default=0.0)


def test_posterior_fit_records_the_search(llama_dir, lora_dir, items):
    post = Posterior.from_adapter(fresh_base(llama_dir), lora_dir)
    r = post.fit(items, criterion="accuracy", eps=0.2, num_samples=K, seed=SEED, sigma_init=SIGMA_INIT, mode="letter",
                 holdout=0.0, progress=False)
    assert post.sigma == r.sigma > 0
    cfg = post.config
    assert (cfg.criterion, cfg.eps, cfg.num_samples, cfg.seed, cfg.mode) == ("accuracy", 0.2, K, SEED, "letter")
    assert [p["sigma"] for p in cfg.search_trace] == [p.sigma for p in r.trace]


def test_bad_arguments(post, items):
    with pytest.raises(TFBError, match="unknown criterion 'kl'.*nll, accuracy"):
        search_sigma(post, items, criterion="kl", progress=False)
    with pytest.raises(TFBError, match="unknown mode"):
        search_sigma(post, items, mode="logits", progress=False)
    with pytest.raises(TFBError, match="eps must be > 0"):
        search_sigma(post, items, eps=0, progress=False)
    with pytest.raises(TFBError, match="num_samples must be >= 1"):
        search_sigma(post, items, num_samples=0, progress=False)
    with pytest.raises(TFBError, match="empty"):
        search_sigma(post, [], progress=False)
    unlabelled = mc_items(3, answers=False)
    with pytest.raises(TFBError, match="gold labels"):
        search_sigma(post, unlabelled, gold_labels=True, progress=False)
