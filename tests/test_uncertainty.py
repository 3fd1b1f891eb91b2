"""tfb_core.uncertainty against float64 references written here, and hand-computed cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tfb_core.uncertainty import (accuracy, auroc, brier, decompose, ece, entropy, nll, reliability,
                                  risk_coverage)


def dirichlet(*shape, conc=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gamma = -torch.log(torch.rand(*shape, generator=g, dtype=torch.float64).clamp_min(1e-300))  # Exp(1)
    gamma = gamma ** (1 / conc)  # a spread of shapes, not an exact Dirichlet: enough here
    return (gamma / gamma.sum(-1, keepdim=True)).to(dtype)


def ref_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.double()
    out = torch.zeros(p.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*map(range, p.shape[:-1])):
        out[idx] = -sum(float(v) * math.log(float(v)) for v in p[idx] if v > 0)
    return out


def test_entropy_against_reference():
    p = dirichlet(5, 7, conc=0.3, seed=1)
    p[0, 0] = 0
    p[0] = p[0] / p[0].sum()
    assert torch.allclose(entropy(p).double(), ref_entropy(p), atol=1e-6)
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0
    assert entropy(torch.full((4,), 0.25, dtype=torch.float64)).item() == pytest.approx(math.log(4), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conc", [0.2, 1.0, 5.0])
def test_decompose_properties(dtype, conc):
    sp = dirichlet(50, 6, 4, conc=conc, seed=2, dtype=dtype)  # (N, K, C)
    u = decompose(sp)
    # references in float64, written independently
    p = sp.double().mean(1)
    pe = ref_entropy(p)
    ee = ref_entropy(sp.double()).mean(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(u.probs.double(), p, atol=tol)
    assert torch.allclose(u.probs.sum(-1).double(), torch.ones(50, dtype=torch.float64), atol=tol)
    assert torch.allclose(u.predictive_entropy.double(), pe, atol=tol)
    assert torch.allclose(u.expected_entropy.double(), ee, atol=tol)
    assert torch.allclose(u.mutual_information.double(), (pe - ee).clamp_min(0), atol=tol)
    assert torch.all(u.mutual_information >= 0)
    assert torch.allclose(u.predictive_entropy, u.expected_entropy + u.mutual_information, atol=tol)


def test_decompose_agreeing_samples_have_no_mi():
    p = dirichlet(10, 1, 5, seed=3).expand(10, 8, 5).contiguous()
    u = decompose(p)
    assert torch.all(u.mutual_information >= 0)  # clamped at 0, never negative
    assert u.mutual_information.max().item() < 1e-6  # float32 rounding of the mean only
    u1 = decompose(dirichlet(10, 1, 5, seed=3))  # K = 1
    assert torch.all(u1.mutual_information == 0)
    # disagreeing confident samples: MI close to PE
    sharp = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    u2 = decompose(sharp)
    assert u2.mutual_information.item() == pytest.approx(math.log(2), abs=1e-6)
    assert u2.expected_entropy.item() == 0.0


# --- calibration metrics ------------------------------------------------------------------------


def test_accuracy_nll_brier_against_reference():
    probs = dirichlet(40, 5, conc=0.5, seed=4, dtype=torch.float64)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(5))
    acc = sum(int(probs[i].argmax() == labels[i]) for i in range(40)) / 40
    ref_nll = sum(-math.log(float(probs[i, labels[i]])) for i in range(40)) / 40
    ref_brier = sum(sum((float(probs[i, c]) - float(c == int(labels[i]))) ** 2 for c in range(5)) for i in range(40)) / 40
    assert accuracy(probs, labels) == pytest.approx(acc, abs=1e-6)
    assert nll(probs, labels) == pytest.approx(ref_nll, rel=1e-10)
    assert brier(probs, labels) == pytest.approx(ref_brier, rel=1e-10)
    assert nll(probs.float(), labels) == pytest.approx(ref_nll, rel=1e-5)
    assert brier(probs.float(), labels) == pytest.approx(ref_brier, rel=1e-5)


def test_ece_hand_computed():
    # confidences 0.95 (right), 0.95 (wrong), 0.52 (right):
    #   bin 14 (14/15, 1]: |0.95 - 0.5| * 2 items; bin 7 (7/15, 8/15]: |0.52 - 1| * 1 item
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.52, 0.48]])
    labels = torch.tensor([0, 0, 0])
    assert ece(probs, labels) == pytest.approx(100 * (2 * 0.45 + 0.48) / 3, abs=1e-4)
    # perfectly calibrated: confidence 1 and right
    assert ece(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0
    # 0.7 and 0.72 share bin 10 (2/3, 11/15]: mean conf 0.71, accuracy 1/2 -> 21.0
    probs = torch.tensor([[0.7, 0.3], [0.28, 0.72]])
    assert ece(probs, torch.tensor([0, 0]), bins=15) == pytest.approx(21.0, abs=1e-4)
    # with 10 bins they land in different bins: |0.7 - 1| and |0.72 - 0| -> (0.3 + 0.72) / 2
    assert ece(probs, torch.tensor([0, 0]), bins=10) == pytest.approx(51.0, abs=1e-4)


def ref_ece(probs, labels, bins=15):
    total = 0.0
    n = len(labels)
    conf = [float(probs[i].max()) for i in range(n)]
    right = [float(probs[i].argmax() == labels[i]) for i in range(n)]
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(n) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if members:
            gap = abs(sum(conf[i] for i in members) / len(members) - sum(right[i] for i in members) / len(members))
            total += len(members) / n * gap
    return 100 * total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_against_reference(seed):
    probs = dirichlet(300, 4, conc=0.4, seed=seed, dtype=torch.float64)
    labels = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(seed + 10))
    assert ece(probs, labels) == pytest.approx(ref_ece(probs, labels), abs=1e-8)
    rel = reliability(probs, labels)
    assert sum(rel["count"]) == 300 and len(rel["count"]) == 15


def ref_auroc(scores, positives):
    pos = [float(s) for s, p in zip(scores, positives) if p]
    neg = [float(s) for s, p in zip(scores, positives) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_against_pairwise_count(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (60,), generator=g).float()  # many ties
    positives = torch.rand(60, generator=g) < 0.4
    assert auroc(scores, positives) == pytest.approx(ref_auroc(scores, positives), abs=1e-12)
    cont = torch.randn(60, generator=g)
    assert auroc(cont, positives) == pytest.approx(ref_auroc(cont, positives), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert auroc(torch.tensor([0.9, 0.1]), torch.tensor([False, True])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([True, False, False])) == 0.5
    assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))


def test_risk_coverage_against_brute_force():
    g = torch.Generator().manual_seed(7)
    u = torch.randint(0, 5, (40,), generator=g).float()  # ties kept in input order
    correct = torch.rand(40, generator=g) < 0.6
    coverage, risk, area = risk_coverage(u, correct)
    order = sorted(range(40), key=lambda i: (float(u[i]), i))
    ref_risk = [sum(1 for i in order[:k] if not correct[i]) / k for k in range(1, 41)]
    assert torch.allclose(risk, torch.tensor(ref_risk, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(coverage, torch.arange(1, 41, dtype=torch.float64) / 40)
    assert area == pytest.approx(sum(ref_risk) / 40, abs=1e-12)
    # rejecting by a perfect uncertainty: all errors last, so the first kept are all right
    perfect = (~correct).float()
    _, risk_p, area_p = risk_coverage(perfect, correct)
    assert risk_p[: int(correct.sum())].max().item() == 0.0 and area_p < area
