"""The learned confidence (tfb_core.confidence) and abstention on it (tfb_core.conformal).

References are computed again here: the features in numpy, the logistic regression by Newton's
method (IRLS) in numpy, the cross-fitted log loss by hand; the abstention bound is checked over
many seeded synthetic calibration draws against a large test draw of the same distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_conformal import np_entropy, np_tempered_average

from tfb_core.confidence import CANDIDATES, FEATURES, Confidence, features, fit_confidence, fit_logistic, log_loss
from tfb_core.conformal import Calibration, calibrate, decide, risk_threshold
from tfb_core.errors import TFBError


def np_features(samples: np.ndarray, temperature: float) -> np.ndarray:
    """(N, K, C) -> (N, 6), written again from the module's docstring."""
    avg = np_tempered_average(samples, temperature)  # (N, C)
    top = -np.sort(-avg, -1)
    pe = np_entropy(samples.mean(1))
    ee = np_entropy(samples).mean(1)
    agree = (samples.argmax(-1) == avg.argmax(-1)[:, None]).mean(1)
    return np.stack([np.log(top[:, 0]), top[:, 0] - top[:, 1], pe, ee, np.maximum(pe - ee, 0), agree], 1)


def irls(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression (intercept unpenalised) by Newton's method on standardised x."""
    z = np.concatenate([x, np.ones((len(x), 1))], 1)
    w = np.zeros(z.shape[1])
    pen = np.full(z.shape[1], l2)
    pen[-1] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) + pen * w
        hess = z.T @ (z * (p * (1 - p))[:, None]) + np.diag(pen)
        w = w - np.linalg.solve(hess, grad)
    return w[:-1], float(w[-1])


def synthetic(n: int, k: int = 5, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample probabilities (n, K, C) with a spread of agreement, and labels that follow the
    average's confidence (so the features carry signal)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(n, 1, c, generator=g, dtype=torch.float64) * 2.0
    spread = torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 2.5
    logits = centre + spread * torch.randn(n, k, c, generator=g, dtype=torch.float64)
    sp = torch.softmax(logits, -1)
    avg = sp.mean(1)
    pred = avg.argmax(-1)
    right = torch.rand(n, generator=g, dtype=torch.float64) < avg.max(-1).values * (1 - 0.3 * spread[:, 0, 0] / 2.5)
    other = (pred + 1 + torch.randint(0, c - 1, (n,), generator=g)) % c
    return sp, torch.where(right, pred, other)


def test_features_match_numpy():
    sp, _ = synthetic(40, seed=1)
    for t in (1.0, 2.5):
        np.testing.assert_allclose(features(sp, t).numpy(), np_features(sp.numpy(), t), atol=1e-10)


def test_logistic_matches_newtons_method():
    sp, y = synthetic(300, seed=2)
    x = features(sp, 1.5)
    right = (sp.mean(1).argmax(-1) == y).double()
    conf = fit_logistic(x, right)
    mean, scale = x.mean(0).numpy(), x.std(0, unbiased=False).numpy()
    w, b = irls(((x.numpy() - mean) / scale), right.numpy())
    np.testing.assert_allclose(conf.coef, w, atol=1e-5)
    assert conf.intercept == pytest.approx(b, abs=1e-5)
    np.testing.assert_allclose(conf(x).numpy(), 1 / (1 + np.exp(-(((x.numpy() - mean) / scale) @ w + b))), atol=1e-6)


def test_fit_confidence_picks_by_cross_fitted_log_loss_and_refits_on_all():
    sp, y = synthetic(200, seed=3)
    t = 1.3
    conf = fit_confidence(sp, y, t, folds=5, seed=7)
    assert set(conf.cv_log_loss) == set(CANDIDATES) and conf.n == 200
    best = min(conf.cv_log_loss, key=conf.cv_log_loss.get)
    assert (conf.model, conf.features) == (("max_prob", []) if best == "max_prob" else ("logistic", list(CANDIDATES[best])))
    # the cross-fitted log loss of each candidate, recomputed with the same folds
    x = np_features(sp.numpy(), t)
    right = (sp.numpy().mean(1).argmax(-1) == y.numpy()).astype(float)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(7)).numpy()
    for name, cols in CANDIDATES.items():
        out = np.empty(200)
        for f in range(5):
            test = order[f::5]
            train = np.setdiff1d(np.arange(200), test)
            if not cols:
                out[test] = np.exp(x[test, 0])
                continue
            idx = [FEATURES.index(c) for c in cols]
            mean, scale = x[train][:, idx].mean(0), x[train][:, idx].std(0)
            scale = np.where(scale > 1e-12, scale, 1.0)
            w, b = irls((x[train][:, idx] - mean) / scale, right[train])
            out[test] = 1 / (1 + np.exp(-(((x[test][:, idx] - mean) / scale) @ w + b)))
        p = np.clip(out, 1e-6, 1 - 1e-6)
        hand = float(-(right * np.log(p) + (1 - right) * np.log(1 - p)).mean())
        assert conf.cv_log_loss[name] == pytest.approx(hand, abs=1e-4), name
    # the chosen model is refitted on every item
    if conf.model != "max_prob":
        idx = [FEATURES.index(c) for c in conf.features]
        mean, scale = x[:, idx].mean(0), x[:, idx].std(0)
        w, _ = irls((x[:, idx] - mean) / scale, right)
        np.testing.assert_allclose(conf.coef, w, atol=1e-5)


def test_signal_in_the_samples_is_learned():
    """Correctness that depends on the samples' agreement only: max p cannot see it, the
    learned confidence does, and ranks wrong answers better."""
    g = torch.Generator().manual_seed(4)
    n, k = 600, 8
    sp = torch.softmax(torch.randn(n, 1, 3, generator=g, dtype=torch.float64) * 0.3
                       + torch.randn(n, k, 3, generator=g, dtype=torch.float64)
                       * torch.rand(n, 1, 1, generator=g, dtype=torch.float64) * 3, -1)
    mi = torch.tensor(np_entropy(sp.numpy().mean(1)) - np_entropy(sp.numpy()).mean(1))
    pred = sp.mean(1).argmax(-1)
    right = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(2 - 6 * mi)
    y = torch.where(right, pred, (pred + 1) % 3)
    conf = fit_confidence(sp[:400], y[:400])
    assert conf.model == "logistic" and "mutual_information" in conf.features
    test_wrong = (pred[400:] != y[400:]).numpy()
    from tfb_core.uncertainty import auroc

    learned = auroc(-conf.of(sp[400:]), torch.tensor(test_wrong))
    maxp = auroc(-sp[400:].mean(1).max(-1).values, torch.tensor(test_wrong))
    assert learned > maxp + 0.05, (learned, maxp)


@pytest.mark.parametrize("case", ["few", "all right"])
def test_nothing_to_learn_is_max_prob(case):
    sp, y = synthetic(8 if case == "few" else 50, seed=5)
    if case == "all right":
        y = sp.mean(1).argmax(-1)
    conf = fit_confidence(sp, y)
    assert conf.model == "max_prob" and conf.cv_log_loss == {}
    np.testing.assert_allclose(conf.of(sp, 2.0).numpy(), np_tempered_average(sp.numpy(), 2.0).max(-1), atol=1e-12)


def test_a_confidence_round_trips_and_bad_records_name_the_field():
    sp, y = synthetic(100, seed=6)
    conf = fit_confidence(sp, y)
    again = Confidence.from_dict(conf.to_dict())
    torch.testing.assert_close(again.of(sp), conf.of(sp))
    bad = {**conf.to_dict(), "model": "logistic", "features": ["log_max_prob"], "mean": [0.0], "scale": [0.0],
           "coef": [1.0]}  # a zero scale
    with pytest.raises(TFBError, match="tfb_config.json: 'confidence'"):
        Confidence.from_dict(bad)
    with pytest.raises(TFBError, match="'confidence.model' must be one of"):
        Confidence.from_dict({"model": "forest"})


# --- abstention on the confidence -----------------------------------------------------------------


def test_calibrate_records_the_confidence_and_decides_on_it():
    sp, y = synthetic(400, seed=8)
    conf = fit_confidence(sp[:200], y[:200], 1.2)
    cal = calibrate(sp[200:], y[200:], 1.2, confidence=conf, abstain_on="confidence", max_risk=0.45)
    np.testing.assert_allclose(cal.confidence, conf.of(sp[200:], 1.2).numpy())
    rule = cal.risk_threshold()
    torch.testing.assert_close(cal.uncertainty(), 1 - torch.tensor(cal.confidence, dtype=torch.float64))
    assert rule.threshold is not None
    again = Calibration.from_dict(cal.to_dict())
    for c in (0.2, 1 - rule.threshold + 1e-9, 0.99):
        probs = torch.tensor([0.5, 0.3, 0.2])
        d = decide(again, probs, {"confidence": c, "mutual_information": 0.0, "predictive_entropy": 0.0})
        assert d.abstain == (1 - c > rule.threshold)
        assert not any("prediction set" in r for r in d.reasons)  # the set rule is opt-in
        d = decide(again, probs, {"confidence": 0.99, "mutual_information": 0.0, "predictive_entropy": 0.0},
                   abstain_on_set=True)
        assert d.abstain == (len(d.indices) != 1)
    missing = {**cal.to_dict(), "confidence": None}
    with pytest.raises(TFBError, match="abstains on confidence but records none"):
        Calibration.from_dict(missing)


def test_the_certified_risk_holds_over_many_seeded_calibration_draws():
    """At risk 0.2 with 450 calibration items (the demo's held-out size): over 50 seeded draws,
    the error rate among a large test draw's answered items is <= 0.2 in at least 90% of them
    (the certificate promises 95%: delta = 0.05), and the rule answers a useful share."""
    rng = np.random.default_rng(0)

    def draw(n):  # a calibrated confidence: P(right | c) = c
        c = rng.beta(5, 2, n)
        return c, rng.random(n) < c

    test_c, test_right = draw(200_000)
    held, answered = 0, []
    for _ in range(50):
        c, right = draw(450)
        rule = risk_threshold(torch.tensor(1 - c), torch.tensor(right), 0.2, 0.05)
        if rule.threshold is None:
            held += 1
            continue
        accept = 1 - test_c <= rule.threshold
        risk = 1 - test_right[accept].mean()
        held += risk <= 0.2
        answered.append(accept.mean())
    assert held >= 45, held
    assert np.mean(answered) > 0.3, np.mean(answered)


def test_log_loss_is_the_mean_binary_cross_entropy():
    p, y = torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 0.0, 0.0])
    assert log_loss(p, y) == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
