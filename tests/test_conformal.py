"""The math of issue 11, on synthetic numbers only (no model): fast.

- Temperature placement (tfb_core.uncertainty): the temperature tempers the model average,
  ``softmax(log(mean_k p_k) / T)``; PE, EE and MI stay those of the untempered samples.
- Split conformal prediction (tfb_core.conformal): the threshold against hand-computed ranks,
  LAC and APS sets against hand-computed scores, and the coverage over many seeds against its
  exact expectation ``k / (n + 1)``.
- Abstention: the Clopper-Pearson bound against a binomial CDF written here with math.comb,
  and the certified risk on data whose true conditional error rate is known.
- cv-nll and the two-sided nll (tfb_core.search) on synthetic model averages.

Every reference is computed here (numpy, fractions, math.comb), never by the code under test.
"""

from __future__ import annotations

import math
import random
import re
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

from tfb_core.conformal import (Calibration, binomial_upper, choice_nonconformity, covers, decide, max_coverage,
                                min_calibration_size, nonconformity, prediction_set, risk_threshold, threshold)
from tfb_core.errors import TFBError
from tfb_core.search import Criterion, criterion_value, cv_nll, folds_of, select_sigma_temperature
from tfb_core.uncertainty import decompose, fit_temperature, temper

# --- independent references --------------------------------------------------------------------


def np_entropy(p: np.ndarray) -> np.ndarray:
    """-sum p log p over the last axis, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def np_tempered_average(samples: np.ndarray, T: float) -> np.ndarray:
    """softmax(log(mean_k p_k) / T) of (..., K, C) samples; zero choices stay zero."""
    avg = samples.mean(-2)
    with np.errstate(divide="ignore"):
        z = np.where(avg > 0, np.log(avg) / T, -np.inf)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def rank(n: int, coverage: str) -> int:
    """ceil((n + 1) * coverage) in exact decimal arithmetic (coverage given as a string)."""
    return math.ceil((n + 1) * Fraction(coverage))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed term by term with math.comb."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def cp_upper(k: int, n: int, delta: float) -> float:
    """Clopper-Pearson upper bound: the p with P(Bin(n, p) <= k) = delta (bisection on binom_cdf)."""
    if n == 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom_cdf(k, n, mid) > delta else (lo, mid)
    return hi


def sgr_reference(u: np.ndarray, correct: np.ndarray, max_risk: float, delta: float):
    """The abstention rule as docs/method.md §5 / tfb_core.conformal document it, written again:
    sort by uncertainty; binary search over the sorted values for the largest threshold whose
    accepted items (ties included) have a Clopper-Pearson bound <= max_risk at delta / steps,
    steps = ceil(log2 n) + 1. Returns (threshold or None, accepted, errors)."""
    n = len(u)
    order = np.argsort(u, kind="stable")
    us, wrong = u[order], ~correct[order]
    steps = math.ceil(math.log2(n)) + 1
    best = (None, 0, 0)
    lo, hi, seen = 0, n - 1, set()
    while lo <= hi and len(seen) < steps:
        mid = (lo + hi + 1) // 2
        if mid in seen:
            break
        seen.add(mid)
        accepted = int((us <= us[mid]).sum())
        errors = int(wrong[:accepted].sum())
        if cp_upper(errors, accepted, delta / steps) <= max_risk:
            best, lo = (float(us[mid]), accepted, errors), mid + 1
        else:
            hi = mid - 1
    return best


# --- 1. temperature on the model average -------------------------------------------------------


@pytest.mark.parametrize("T", [0.4, 1.0, 2.5, 7.0])
def test_temperature_tempers_the_average_only(T):
    rng = np.random.default_rng(1)
    samples = rng.dirichlet([0.7] * 5, size=(6, 4))  # (N, K, C)
    samples[4, :, 3:] = 0.0  # item 4 has 3 choices, padded with zeros
    samples[4] /= samples[4].sum(-1, keepdims=True)
    sp = torch.from_numpy(samples)
    u, u1 = decompose(sp, T), decompose(sp, 1.0)
    # PE, EE and MI do not move with T: bit for bit those of T = 1 ...
    for name in ("predictive_entropy", "expected_entropy", "mutual_information"):
        assert torch.equal(getattr(u, name), getattr(u1, name)), name
    # ... and equal to the untempered samples' decomposition, PE = EE + MI
    pe, ee = np_entropy(samples.mean(1)), np_entropy(samples).mean(1)
    np.testing.assert_allclose(u.predictive_entropy.numpy(), pe, atol=1e-12)
    np.testing.assert_allclose(u.expected_entropy.numpy(), ee, atol=1e-12)
    np.testing.assert_allclose(u.mutual_information.numpy(), pe - ee, atol=1e-12)
    np.testing.assert_allclose((u.expected_entropy + u.mutual_information).numpy(), pe, atol=1e-12)
    # probs: softmax(log(mean_k p_k) / T), not the average of tempered samples
    np.testing.assert_allclose(u.probs.numpy(), np_tempered_average(samples, T), atol=1e-12)
    assert u.temperature == T
    # padded choices stay exactly zero, real ones positive, rows sum to 1
    assert (u.probs[4, 3:] == 0).all() and (u.probs[4, :3] > 0).all()
    np.testing.assert_allclose(u.probs.sum(-1).numpy(), 1.0, atol=1e-12)


def test_tempering_the_average_differs_from_tempering_each_sample():
    """The old (format 1) placement gives other probabilities: the test above can tell them apart."""
    samples = np.array([[[0.9, 0.1], [0.2, 0.8]]])
    T = 3.0
    per_sample = np_tempered_average(samples[:, :, None, :], T).mean(1)  # temper each sample, then average
    ours = decompose(torch.from_numpy(samples), T).probs.numpy()
    np.testing.assert_allclose(ours, np_tempered_average(samples, T), atol=1e-12)
    assert abs(ours - per_sample).max() > 1e-3


def test_temper_keeps_zeros_and_t1_is_identity():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]], dtype=torch.float64)
    assert torch.equal(temper(p, 1.0), p)
    for T in (0.3, 4.0):
        out = temper(p, T)
        assert out[0, 3] == 0
        np.testing.assert_allclose(out.numpy(), np_tempered_average(p.numpy()[:, None, :], T), atol=1e-12)


# --- 2. conformal threshold and sets ----------------------------------------------------------


def test_threshold_hand_computed():
    scores = [0.05, 0.1, 0.2, 0.3, 0.45, 0.5, 0.6, 0.7, 0.9]  # n = 9, sorted
    # coverage 0.8: ceil(10 * 0.8) = 8 -> the 8th smallest
    assert threshold(scores, 0.8) == 0.7
    assert threshold(scores, 0.5) == 0.45  # ceil(5) = 5th
    assert threshold(scores, 0.9) == 0.9  # ceil(9) = 9th: exactly 9, not rounded up to 10
    assert threshold(scores, 0.1) == 0.05  # ceil(1) = 1st
    assert threshold(scores, 0.75) == 0.7  # ceil(7.5) = 8th
    for c in ("0.1", "0.5", "0.75", "0.8", "0.9"):
        assert threshold(scores, float(c)) == scores[rank(9, c) - 1]
    # ceil(10 * 0.95) = 10 > 9: an error naming the minimum, 19
    with pytest.raises(TFBError, match=r"coverage 0\.95 needs at least 19 calibration scores; this posterior has 9"):
        threshold(scores, 0.95)


@pytest.mark.parametrize("coverage", ["0.5", "0.8", "0.9", "0.95", "0.975", "0.99", "0.123"])
def test_min_calibration_size(coverage):
    expected = next(n for n in range(1, 10_000) if rank(n, coverage) <= n)
    assert min_calibration_size(float(coverage)) == expected
    assert min_calibration_size(0.9) == 9 and min_calibration_size(0.95) == 19


def loop_min_size(coverage: float) -> int:
    """The search min_calibration_size once ran (1/(1 - coverage) steps), its rank in floats."""
    n = 1
    while math.ceil((n + 1) * coverage - 1e-9) > n:
        n += 1
    return n


def near_one() -> list[float]:
    """1 - 10^-k and its float neighbours, for k up to 6 (the loop takes up to 10^6 steps)."""
    out = []
    for k in range(1, 7):
        c = 1 - 10.0 ** -k
        out += [c, math.nextafter(c, 0), math.nextafter(c, 1), float(f"0.{'9' * k}")]
    return out


def test_min_calibration_size_is_the_loops_answer_in_closed_form():
    rng = random.Random(0)
    coverages = ([i / 1000 for i in range(1, 1000)] + [rng.random() for _ in range(2000)]
                 + [1 - (0.1 + rng.random()) * 1e-3 for _ in range(200)] + near_one())
    for c in coverages:
        n = min_calibration_size(c)
        assert n == loop_min_size(c), c
        assert covers(n, c) and (n == 1 or not covers(n - 1, c))  # what threshold() decides


@pytest.mark.parametrize("nines", range(7, 17))
def test_min_calibration_size_near_one_is_exact_and_immediate(nines):
    """0.9999999 ... 0.9999999999999999 (the float nearest 1 - 10^-16 is 1 - 2^-53 x 1): the loop
    took 15 s at 8 nines and never ended at 16; the closed form is the exact rational answer."""
    c = float("0." + "9" * nines)
    t0 = time.perf_counter()
    n = min_calibration_size(c)
    assert time.perf_counter() - t0 < 0.01
    exact, m = Fraction(c), Fraction(1e-9)
    assert (n + 1) * exact - m <= n < n * exact - m + 1  # the least n, in exact arithmetic
    assert covers(n, c) and not covers(n - 1, c)  # what threshold() decides
    with pytest.raises(TFBError, match=re.escape(f"coverage {c!r} needs at least {n} calibration scores")):
        threshold([0.1] * 19, c)


@pytest.mark.parametrize("n", [1, 2, 9, 19, 99, 2999, 10 ** 5, 123_456])
def test_max_coverage_is_served_and_close_to_the_largest(n):
    c = max_coverage(n)
    assert covers(n, c) and min_calibration_size(c) <= n
    assert 1 - c <= 1.1 * (1 - n / (n + 1)) + 1e-12  # two significant digits of 1 - c, rounded down
    assert len(repr(c)) <= 12


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), True, "0.9"])
def test_coverage_outside_0_1_is_refused(bad):
    with pytest.raises(TFBError, match="coverage must be a number in \\(0, 1\\)"):
        threshold([0.1, 0.2], bad)
    with pytest.raises(TFBError):
        min_calibration_size(bad)


# dyadic probabilities: every score below is exact in binary
P = [0.375, 0.25, 0.25, 0.125]  # choices 1 and 2 tie


def test_lac_and_aps_scores_hand_computed():
    p = torch.tensor(P, dtype=torch.float64)
    # LAC: 1 - p_c
    assert choice_nonconformity(p, "lac").tolist() == [0.625, 0.75, 0.75, 0.875]
    # APS (not randomised): the mass of the choices strictly more likely than c, plus p_c;
    # the tied choices 1 and 2 both get 0.375 + 0.25
    assert choice_nonconformity(p, "aps").tolist() == [0.375, 0.625, 0.625, 1.0]
    labels = torch.tensor([3, 1, 0])
    probs = p.repeat(3, 1)
    assert nonconformity(probs, labels, "lac").tolist() == [0.875, 0.75, 0.625]
    assert nonconformity(probs, labels, "aps").tolist() == [1.0, 0.625, 0.375]


@pytest.mark.parametrize("score,q,expected", [
    ("lac", 0.5, []),  # LAC sets may be empty
    ("lac", 0.625, [0]),
    ("lac", 0.7, [0]),
    ("lac", 0.75, [0, 1, 2]),  # ties enter together
    ("lac", 0.875, [0, 1, 2, 3]),
    ("aps", 0.3, []),
    ("aps", 0.375, [0]),
    ("aps", 0.625, [0, 1, 2]),
    ("aps", 0.99, [0, 1, 2]),
    ("aps", 1.0, [0, 1, 2, 3]),
])
def test_prediction_sets_hand_computed(score, q, expected):
    assert prediction_set(torch.tensor(P, dtype=torch.float64), q, score) == expected


def test_prediction_set_lists_the_most_likely_first():
    p = torch.tensor([0.125, 0.25, 0.5, 0.125], dtype=torch.float64)
    assert prediction_set(p, 0.9, "lac") == [2, 1, 0, 3]
    assert prediction_set(p, 0.75, "lac") == [2, 1]


def _coverage_run(score: str, n: int, coverage: float, seeds: int, m: int = 200, C: int = 4):
    """Mean over seeds of the test coverage of split-conformal sets; synthetic exchangeable data:
    Dirichlet model probabilities, labels drawn from a sharper, different distribution (the model
    is miscalibrated), calibration and test items i.i.d."""
    per_seed = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        probs = rng.dirichlet([0.6] * C, size=n + m)
        truth = probs ** 2.5 * rng.dirichlet([3.0] * C, size=n + m)  # not the model's probabilities
        truth /= truth.sum(-1, keepdims=True)
        labels = np.minimum((rng.uniform(size=(n + m, 1)) > truth.cumsum(-1)).sum(-1), C - 1)
        p, y = torch.from_numpy(probs), torch.from_numpy(labels)
        q = threshold(sorted(nonconformity(p[:n], y[:n], score).tolist()), coverage)
        covered = choice_nonconformity(p[n:], score).gather(1, y[n:, None]).squeeze(1) <= q
        per_seed.append(covered.double().mean().item())
        if seed < 3:  # the served set (prediction_set) is the same as the scores' comparison
            for i in range(n, n + 5):
                members = set(prediction_set(p[i], q, score))
                assert members == {c for c in range(C) if choice_nonconformity(p[i], score)[c] <= q}
    return np.array(per_seed)


@pytest.mark.parametrize("score,n,coverage", [
    ("lac", 19, "0.9"), ("lac", 50, "0.8"), ("lac", 99, "0.95"), ("aps", 50, "0.9"), ("aps", 30, "0.8"),
])
def test_split_conformal_coverage_over_seeds(score, n, coverage):
    """Exact: with continuous scores, P(y in set) = k / (n + 1), k = ceil((n + 1) * coverage),
    and the set coverage given the calibration draw is Beta(k, n + 1 - k); so the mean over S
    seeds of m test items has variance mu (1 - mu) / (n + 2) * (1 + (n + 1) / m) / S."""
    seeds, m = 300, 200
    k = rank(n, coverage)
    mu = k / (n + 1)
    sd = math.sqrt(mu * (1 - mu) / (n + 2) * (1 + (n + 1) / m) / seeds)
    cov = _coverage_run(score, n, float(coverage), seeds, m)
    assert abs(cov.mean() - mu) <= 4 * sd, (cov.mean(), mu, sd)
    assert cov.mean() >= float(coverage) - 3 * sd  # never systematically below the target
    # the interval is narrow enough to notice an off-by-one rank (k - 1 instead of k)
    assert 1 / (n + 1) > 4 * sd


# --- 3. abstention: the risk bound --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 19, 200])
@pytest.mark.parametrize("delta", [0.05, 0.01, 0.005])
def test_binomial_upper_without_errors_is_exact(n, delta):
    assert binomial_upper(0, n, delta) == pytest.approx(1 - delta ** (1 / n), abs=1e-14)


@pytest.mark.parametrize("k,n,delta", [(1, 10, 0.05), (3, 50, 0.01), (10, 200, 0.05 / 8), (17, 19, 0.0083),
                                       (5, 19, 0.05), (40, 100, 0.2)])
def test_binomial_upper_solves_the_cdf(k, n, delta):
    u = binomial_upper(k, n, delta)
    assert binom_cdf(k, n, u) == pytest.approx(delta, abs=1e-9)
    assert k / n < u < 1
    assert binom_cdf(k, n, u + 1e-6) < delta < binom_cdf(k, n, u - 1e-6)  # the largest such p
    assert u == pytest.approx(cp_upper(k, n, delta), abs=1e-12)


def test_binomial_upper_edges():
    assert binomial_upper(0, 0, 0.05) == 1.0
    assert binomial_upper(5, 5, 0.05) == 1.0


def test_risk_threshold_matches_the_documented_rule():
    """On random data, the threshold, accepted and errors equal the rule written again here."""
    for seed in range(15):
        rng = np.random.default_rng(100 + seed)
        n = int(rng.integers(5, 120))
        u = np.round(rng.uniform(size=n), 2)  # ties
        correct = rng.uniform(size=n) > 0.6 * u
        for max_risk in (0.15, 0.3):
            r = risk_threshold(torch.from_numpy(u), torch.from_numpy(correct), max_risk, 0.05)
            ref = sgr_reference(u, correct, max_risk, 0.05)
            assert (r.threshold, r.accepted, r.errors) == ref, (seed, max_risk)
            if r.threshold is not None:
                accepted = u <= r.threshold
                assert r.accepted == accepted.sum() and r.errors == (~correct[accepted]).sum()
                assert r.risk_bound <= max_risk
                # the certificate is at least as strong as 1 - delta (Bonferroni makes it stronger)
                assert binom_cdf(r.errors, r.accepted, r.risk_bound) <= 0.05 + 1e-9


def test_certified_risk_holds_over_seeds():
    """u ~ U(0, 1), P(wrong | u) = u: the true risk of answering u <= theta is theta / 2. Over
    many calibration draws, the fraction where the certified threshold's TRUE risk exceeds
    max_risk is at most delta (plus Monte-Carlo slack). The naive rule (largest theta whose
    empirical error rate is <= max_risk) fails about half the time, so the check has power."""
    seeds, n, max_risk, delta = 200, 500, 0.2, 0.05
    violations = naive_violations = certified = 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        u = rng.uniform(size=n)
        correct = rng.uniform(size=n) >= u
        r = risk_threshold(torch.from_numpy(u), torch.from_numpy(correct), max_risk, delta)
        if r.threshold is not None:
            certified += 1
            violations += r.threshold / 2 > max_risk
        order = np.argsort(u)
        empirical = np.cumsum(~correct[order]) / np.arange(1, n + 1)
        naive = u[order][np.nonzero(empirical <= max_risk)[0].max()]
        naive_violations += naive / 2 > max_risk
    slack = 3 * math.sqrt(delta * (1 - delta) / seeds)
    assert violations / seeds <= delta + slack, violations
    assert naive_violations / seeds > 0.3, naive_violations
    assert certified >= seeds / 2, certified  # the rule answers something in most draws


def _calibration(u, correct, **kw) -> Calibration:
    n = len(u)
    return Calibration(score="lac", scores=sorted(np.linspace(0.1, 0.9, n).tolist()), mutual_information=list(u),
                       predictive_entropy=list(u), correct=list(correct), **kw)


def test_no_certifiable_threshold_abstains_on_everything():
    # 10 items, all correct: the best bound is 1 - (0.05 / steps) ** (1 / 10) > 0.1
    steps = math.ceil(math.log2(10)) + 1
    assert 1 - (0.05 / steps) ** (1 / 10) > 0.1
    u = np.linspace(0.01, 0.1, 10)
    cal = _calibration(u, [True] * 10, max_risk=0.1)
    rule = cal.risk_threshold()
    assert rule.threshold is None and rule.accepted == 0
    probs = torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64)
    d = decide(cal, probs, {"mutual_information": 0.0, "predictive_entropy": 0.0}, coverage=0.5)
    assert d.indices == [0] and d.abstain  # a single-choice set, yet no threshold: abstain
    assert len(d.reasons) == 1
    assert d.reasons[0].startswith("no mutual_information threshold certifies an error rate <= 0.1 on the 10")


def test_decide_hand_computed():
    """Set at coverage 0.8 of 9 scores 0.1..0.9: the 8th, q = 0.8; all 60 items correct, so a
    threshold is certified; abstain exactly when MI is above it, and with abstain_on_set also
    when the set is not one choice."""
    u = np.linspace(0.001, 0.06, 60)
    cal = Calibration(score="lac", scores=[0.1 * i for i in range(1, 10)], mutual_information=list(u),
                      predictive_entropy=list(u), correct=[True] * 60, max_risk=0.2)
    # every item is correct: the search accepts more at every step and ends at the largest value
    theta, accepted, errors = sgr_reference(u, np.ones(60, bool), 0.2, 0.05)
    assert cal.risk_threshold().threshold == theta == u.max() and accepted == 60
    q = 0.1 * 8
    cases = [([0.5, 0.35, 0.15], 0.0, False),  # 1 - p = 0.5, 0.65, 0.85: {0, 1}
             ([0.9, 0.05, 0.05], 0.0, True),
             ([0.9, 0.05, 0.05], 0.07, True)]
    for p, mi, single in cases:
        probs = torch.tensor(p, dtype=torch.float64)
        expected = sorted((c for c in range(3) if 1 - p[c] <= q + 1e-12), key=lambda c: -p[c])
        d = decide(cal, probs, {"mutual_information": mi, "predictive_entropy": mi}, coverage=0.8)
        assert d.indices == expected and d.threshold == q
        assert (len(expected) == 1) == single
        assert d.abstain == (mi > theta) and not any("prediction set" in r for r in d.reasons)
        assert any("above" in r for r in d.reasons) == (mi > theta)
        d = decide(cal, probs, {"mutual_information": mi, "predictive_entropy": mi}, coverage=0.8,
                   abstain_on_set=True)
        assert d.abstain == (len(expected) != 1 or mi > theta)
        assert any("prediction set holds" in r for r in d.reasons) == (len(expected) != 1)


# --- 4. cv-nll and the two-sided nll ------------------------------------------------------------


def test_folds_partition():
    folds = folds_of(23, 5, seed=3)
    together = sorted(i for f in folds for i in f.tolist())
    assert together == list(range(23)) and len(folds) == 5
    assert sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]


def _synthetic(seed: int, n: int = 40, C: int = 4, sharp: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, C)) * sharp
    labels = np.array([rng.choice(C, p=np.exp(l) / np.exp(l).sum()) for l in logits / sharp])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return torch.from_numpy(probs), torch.from_numpy(labels)


def hand_cv_nll(probs: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    total = 0.0
    for test in folds_of(len(labels), folds, seed):
        train = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), test.numpy()))
        t = fit_temperature(probs[train], labels[train])
        tempered = np_tempered_average(probs.numpy()[test.numpy()][:, None, :], t)
        total += np_nll(tempered, labels.numpy()[test.numpy()]) * len(test)
    return total / len(labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_cv_nll_is_the_fold_loop(seed):
    probs, labels = _synthetic(seed)
    assert cv_nll(probs, labels, folds=5, seed=seed) == pytest.approx(hand_cv_nll(probs, labels, 5, seed), rel=1e-9)


def test_fit_temperature_minimises_the_nll():
    probs, labels = _synthetic(4, n=60)
    t = fit_temperature(probs, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    values = [np_nll(np_tempered_average(probs.numpy()[:, None, :], g), labels.numpy()) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(values))], rel=5e-3)


def test_select_sigma_temperature_excludes_accuracy_drops():
    """sigma 0.004 has the lowest cross-fitted NLL but costs 10 accuracy points: excluded."""
    n = 40
    labels = torch.tensor([i % 4 for i in range(n)])

    def probs_with(p_true: float, wrong_items: set[int]) -> torch.Tensor:
        """p_true on the answer; on ``wrong_items`` the answer has 0.1 and the next choice 0.6."""
        out = torch.empty(n, 4, dtype=torch.float64)
        for i in range(n):
            y = int(labels[i])
            if i in wrong_items:
                row = [0.15] * 4
                row[y], row[(y + 1) % 4] = 0.1, 0.6
            else:
                row = [(1 - p_true) / 3] * 4
                row[y] = p_true
            out[i] = torch.tensor(row)
        return out

    base_wrong = set(range(0, n, 5))  # 8 wrong: accuracy 0.8
    by_sigma = {
        0.0: probs_with(0.4, base_wrong),
        0.001: probs_with(0.5, base_wrong),  # same accuracy, better ranked
        0.002: probs_with(0.55, base_wrong | {1}),  # 2.5 points worse
        0.004: probs_with(0.97, base_wrong | {1, 2, 3, 6}),  # far lower NLL, 10 points worse
    }
    accs = {s: float((p.argmax(-1) == labels).double().mean()) for s, p in by_sigma.items()}
    assert accs[0.0] == 0.8 and accs[0.001] == 0.8 and accs[0.002] == 0.775 and accs[0.004] == 0.7
    values = {s: hand_cv_nll(p, labels) for s, p in by_sigma.items()}
    assert min(values, key=values.get) == 0.004  # the infeasible sigma would win without the constraint

    for max_drop, allowed in ((0.01, {0.0, 0.001}), (0.03, {0.0, 0.001, 0.002}), (0.2, set(by_sigma))):
        sigma, T, trace = select_sigma_temperature(by_sigma, labels, max_acc_drop=max_drop)
        assert {p.sigma for p in trace if p.feasible} == allowed, max_drop
        expected = min(allowed, key=lambda s: (values[s], -s))
        assert sigma == expected
        for p in trace:
            assert p.value == pytest.approx(values[p.sigma], rel=1e-9)
            assert p.accuracy == pytest.approx(accs[p.sigma])
        assert T == pytest.approx(fit_temperature(by_sigma[sigma], labels))


def test_select_sigma_temperature_needs_sigma_0_and_enough_items():
    probs, labels = _synthetic(0, n=40)
    with pytest.raises(TFBError, match="sigma = 0"):
        select_sigma_temperature({0.01: probs}, labels)
    with pytest.raises(TFBError, match="at least 10 labelled"):
        select_sigma_temperature({0.0: probs[:9]}, labels[:9])


def test_nll_criterion_is_two_sided_and_reference_one_sided():
    labels = torch.tensor([0, 1, 0, 1])
    base = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    better = torch.tensor([[0.7, 0.3], [0.3, 0.7], [0.7, 0.3], [0.3, 0.7]], dtype=torch.float64)
    nll0, nll1 = -math.log(0.6), -math.log(0.7)
    change = (nll1 - nll0) / nll0  # about -0.30: the NLL dropped 30%
    assert change < -0.29
    v = criterion_value(Criterion.NLL, better, labels, nll0, 1.0, gold=False)
    assert v == pytest.approx(abs(change), rel=1e-12)
    assert not v <= 0.003  # infeasible at the paper's eps: a drop counts as a change
    r = criterion_value(Criterion.REFERENCE, better, labels, nll0, 1.0, gold=False)
    assert r == pytest.approx(change, rel=1e-12) and r <= 0.003
