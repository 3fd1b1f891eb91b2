"""Uncertainty of a model average and calibration metrics (docs/method.md §2, §7). All in nats.

Per-sample probabilities have shape (N, K, C): N predictions, K weight samples, C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``-sum p log p`` along ``dim``, with ``0 log 0 = 0``."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim)


@dataclass
class Uncertainty:
    """The model average and its decomposition, one value per prediction.

    ``probs`` is the model average, tempered when ``temperature != 1``; the entropies are always
    those of the untempered weight samples (docs/method.md §5), so PE = EE + MI holds and MI is the
    posterior's own epistemic part.
    """

    probs: torch.Tensor  # (N, C) softmax(log(mean_k p_k) / T)
    predictive_entropy: torch.Tensor  # (N,) H[mean_k p_k]
    expected_entropy: torch.Tensor  # (N,) mean_k H[p_k]
    mutual_information: torch.Tensor  # (N,) PE - EE, >= 0
    temperature: float = 1.0  # applied to ``probs`` only


def decompose(sample_probs: torch.Tensor, temperature: float = 1.0) -> Uncertainty:
    """Average probabilities (not logits) over samples, split the entropy, temper the average.

    sample_probs : (N, K, C) -> Uncertainty with (N, C) and (N,) fields.
    """
    p = sample_probs.mean(1)  # (N, C)
    pe = entropy(p)
    ee = entropy(sample_probs).mean(1)
    mi = (pe - ee).clamp_min(0.0)  # rounding can make it slightly negative
    return Uncertainty(temper(p, temperature), pe, ee, mi, float(temperature))


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)`` over the last axis; zero (padding) probabilities stay zero."""
    if temperature == 1.0:
        return probs
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    logp = torch.log(probs.double().clamp_min(1e-300)) / temperature
    logp = torch.where(probs > 0, logp, torch.full_like(logp, -math.inf))
    return torch.softmax(logp, -1).to(probs.dtype)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T in [lo, hi] that minimises ``nll(temper(probs, T), labels)``; probs (N, C) averages.

    A log-spaced grid, then golden-section refinement around its best point.
    """
    probs = probs.double()

    def loss(log_t: float) -> float:
        return nll(temper(probs, math.exp(log_t)), labels)

    grid = torch.linspace(math.log(lo), math.log(hi), 61).tolist()
    values = [loss(t) for t in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


# --- calibration metrics: probs (N, C), labels (N,) ------------------------------------------


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(-1) == labels).float().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    p = probs.gather(-1, labels[:, None]).squeeze(-1)
    return -torch.log(p.double().clamp_min(1e-12)).mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: ``mean_i sum_c (p_ic - y_ic)^2``."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean().item()


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error x100: equal-width bins on the top-label confidence."""
    conf, pred = probs.max(-1)
    return binary_ece(conf, pred == labels, bins)


def binary_ece(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE x100 of a confidence (N,) in [0, 1] that a prediction is right, against ``correct`` (N,)."""
    conf, correct = conf.double(), correct.double()
    # bin b holds conf in (b/bins, (b+1)/bins]; conf = 0 goes to bin 0
    idx = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    total = torch.zeros(bins, dtype=torch.float64)
    gap = torch.zeros(bins, dtype=torch.float64)
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total[b] = mask.sum()
            gap[b] = (conf[mask].mean() - correct[mask].mean()).abs()
    return (100.0 * (total * gap).sum() / len(conf)).item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Per bin: mean confidence, accuracy and count (for a reliability diagram)."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    idx = (torch.ceil(conf.double() * bins) - 1).clamp(0, bins - 1).long()
    out = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        mask = idx == b
        n = int(mask.sum())
        out["count"].append(n)
        out["confidence"].append(conf[mask].double().mean().item() if n else None)
        out["accuracy"].append(correct[mask].mean().item() if n else None)
    return out


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a positive outscores a negative (ties 1/2).

    Mann-Whitney U with average ranks. NaN when either class is empty.
    """
    scores = scores.double().flatten()
    positives = positives.bool().flatten()
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing their average rank."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    n, i = len(x), 0
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def risk_coverage(uncertainty: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Selective prediction: keep the most certain predictions first.

    Returns (coverage, risk, area): coverage k/N for k = 1..N, risk = error rate among the k
    kept, and the area under the risk-coverage curve (mean risk over k; lower is better).
    Ties in uncertainty are kept in input order (stable sort).
    """
    order = torch.argsort(uncertainty.double(), stable=True)
    errors = (~correct.bool())[order].double()
    k = torch.arange(1, len(errors) + 1, dtype=torch.float64)
    risk = errors.cumsum(0) / k
    coverage = k / len(errors)
    return coverage, risk, risk.mean().item()
