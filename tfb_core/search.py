"""The variance search (TFB_SPEC §4): the largest sigma the adapter accepts on a calibration set.

1. sigma = 0 once: ``p0`` and targets ``y`` (argmax of ``p0``, or the gold labels).
2. A criterion of sigma, evaluated with the same draws ``Z_k`` for every candidate
   (common random numbers), so it is a smooth, monotone-in-practice curve.
3. Bracket: double ``sigma_hi`` while it is feasible; then bisect until the bracket is
   narrower than ``rtol`` (relative) or ``max_steps`` evaluations have run.
4. Return the largest feasible sigma found, and the trace of every evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import MCItem
from .errors import TFBError
from .scoring import Mode, parse_mode, score_items

log = logging.getLogger(__name__)


class Criterion(str, Enum):
    """What "the adapter accepts sigma" means."""

    NLL = "nll"  #: relative increase of the NLL of the targets: (NLL(s) - NLL(0)) / NLL(0) <= eps
    ACCURACY = "accuracy"  #: fraction of changed answers (or accuracy drop with gold labels) <= eps


def parse_criterion(criterion: "Criterion | str") -> Criterion:
    try:
        return Criterion(criterion)
    except ValueError:
        raise TFBError(f"unknown criterion {criterion!r}; allowed: nll, accuracy") from None


@dataclass
class SearchPoint:
    sigma: float
    value: float  # the criterion's value (relative NLL change, or fraction changed / acc drop)
    feasible: bool


@dataclass
class SearchResult:
    sigma: float  # the largest feasible sigma found
    criterion: str
    eps: float
    num_samples: int
    seed: int
    mode: str
    gold_labels: bool
    trace: list[SearchPoint] = field(default_factory=list)
    baseline_nll: float = float("nan")


def criterion_value(criterion: Criterion, probs: torch.Tensor, targets: torch.Tensor,
                    base_nll: float, base_acc: float, gold: bool) -> float:
    """The criterion at one sigma; ``probs`` (N, C) is the K-sample model average."""
    if criterion is Criterion.NLL:
        nll = -torch.log(probs.double().gather(1, targets[:, None]).clamp_min(1e-12)).mean().item()
        return (nll - base_nll) / base_nll
    pred = probs.argmax(-1)
    if gold:
        return base_acc - (pred == targets).double().mean().item()
    return (pred != targets).double().mean().item()


def search_sigma(post, items: Sequence[MCItem], criterion: Criterion | str = Criterion.NLL,
                 eps: float = 0.003, num_samples: int = 10, seed: int = 0,
                 mode: Mode | str = Mode.LETTER, gold_labels: bool = False,
                 sigma_init: float = 1e-3, max_doublings: int = 20, rtol: float = 0.05,
                 max_steps: int = 20, batch_size: int = 8, chat: bool = False,
                 length_normalize: bool = False, progress: bool = True) -> SearchResult:
    """Find the largest sigma whose criterion is within ``eps``.

    Parameters
    ----------
    criterion : {"nll", "accuracy"}, default="nll"
    eps : float, default=0.003
        Tolerance (0.003 = 0.3% relative NLL change, the paper's).
    num_samples : int, default=10
        K weight samples per evaluation.
    gold_labels : bool, default=False
        Use the items' ``answer`` as targets instead of the sigma = 0 predictions.
    sigma_init : float, default=1e-3
        The first upper bracket point.
    rtol : float, default=0.05
        Bisection stops when ``(hi - lo) / hi < rtol`` or after ``max_steps`` steps.
    """
    criterion = parse_criterion(criterion)
    mode = parse_mode(mode)
    if not eps > 0:
        raise TFBError(f"eps must be > 0, got {eps}")
    if num_samples < 1:
        raise TFBError(f"num_samples must be >= 1, got {num_samples}")
    if gold_labels and any(it.answer is None for it in items):
        raise TFBError("gold labels were requested but some calibration items have no 'answer'")
    if not items:
        raise TFBError("the calibration set is empty")
    score = dict(mode=mode, batch_size=batch_size, chat=chat, length_normalize=length_normalize)

    p0 = score_items(post, items, num_samples=1, seed=seed, sigma=0.0, desc="sigma=0", **score)[:, 0]
    targets = torch.tensor([it.answer for it in items]) if gold_labels else p0.argmax(-1)
    base_nll = -torch.log(p0.double().gather(1, targets[:, None]).clamp_min(1e-12)).mean().item()
    base_acc = (p0.argmax(-1) == targets).double().mean().item()
    if criterion is Criterion.NLL and base_nll <= 0:
        raise TFBError("the NLL at sigma = 0 is 0: the relative criterion is undefined; use 'accuracy'")

    trace: list[SearchPoint] = []
    bar = tqdm(desc=f"TFB search ({criterion.value} <= {eps:g})", unit="step", disable=not progress)

    def evaluate(sigma: float) -> bool:
        probs = score_items(post, items, num_samples=num_samples, seed=seed, sigma=sigma,
                            desc=f"sigma={sigma:.3g}", **score).mean(1)
        value = criterion_value(criterion, probs, targets, base_nll, base_acc, gold_labels)
        trace.append(SearchPoint(sigma, value, value <= eps))
        bar.update(1)
        bar.set_postfix(sigma=f"{sigma:.4g}", value=f"{value:.4g}")
        log.info("sigma=%.6g %s=%.6g feasible=%s", sigma, criterion.value, value, value <= eps)
        return value <= eps

    lo, hi = 0.0, float(sigma_init)
    for _ in range(max_doublings):  # bracket: double while feasible
        if not evaluate(hi):
            break
        lo, hi = hi, hi * 2
    else:
        log.warning("sigma %.4g is still feasible after %d doublings; stopping there", lo, max_doublings)
        hi = None
    steps = 0
    while hi is not None and steps < max_steps and (hi - lo) / hi >= rtol:
        steps += 1
        mid = (lo + hi) / 2
        if evaluate(mid):
            lo = mid
        else:
            hi = mid
    bar.close()
    if lo == 0.0:
        log.warning("no sigma > 0 met the criterion; the posterior is the deterministic adapter")
    return SearchResult(sigma=lo, criterion=criterion.value, eps=eps, num_samples=num_samples,
                        seed=seed, mode=mode.value, gold_labels=gold_labels, trace=trace,
                        baseline_nll=base_nll)
