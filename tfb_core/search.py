"""The variance search (docs/method.md §4): the largest sigma the adapter accepts on a calibration set.

The paper's criteria (``nll``, ``accuracy``):

1. sigma = 0 once: ``p0`` and targets ``y`` (argmax of ``p0``, or the gold labels).
2. A criterion of sigma, evaluated with the same draws ``Z_k`` for every candidate
   (common random numbers), so it is a smooth, monotone-in-practice curve.
3. Bracket: double ``sigma_hi`` while it is feasible; then bisect until the bracket is
   narrower than ``rtol`` (relative) or ``max_steps`` evaluations have run.
4. Return the largest feasible sigma found, and the trace of every evaluation.

``cv-nll`` (labelled calibration data): over a grid of sigmas, the temperature of the model
average is fitted on k - 1 folds and the NLL measured on the k-th (cross-fitting); the sigma
with the lowest cross-fitted NLL whose accuracy is within ``max_acc_drop`` of sigma = 0 wins,
and T is then refitted on every item at that sigma.

``reference``: the search of the paper's public code (bayesian-peft), kept so results can be
compared with the published ones: bisection on [0.001, 0.015], 5 steps, the relative NLL change
compared with ``eps * N``, returning the upper end of the last bracket.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import MCItem
from .options import EPS, MAX_ACC_DROP, NUM_SAMPLES, SEED, Criterion, parse_criterion
from .errors import TFBError
from .scoring import Mode, parse_mode, score_items
from .uncertainty import accuracy, fit_temperature, nll, temper

log = logging.getLogger(__name__)


LABELLED = (Criterion.CV_NLL,)  # criteria that need an answer on every calibration item
#: cv-nll's default sigmas: 0 and 1e-3 x 1.5^i up to ~0.09
CV_GRID = (0.0,) + tuple(round(1e-3 * 1.5 ** i, 6) for i in range(12))


@dataclass
class SearchPoint:
    sigma: float
    value: float  # the criterion's value (relative NLL change, fraction changed / acc drop, CV NLL)
    feasible: bool
    temperature: float | None = None  # cv-nll: T fitted on every item at this sigma
    accuracy: float | None = None  # cv-nll: accuracy of the model average


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
    temperature: float | None = None  # cv-nll: fitted together with sigma
    # sigma -> the searched items' per-sample probabilities (N, K, C) it scored (sigma 0, and every
    # cv-nll grid point), so that fitting after the search does not score them again
    scored: dict = field(default_factory=dict, repr=False, compare=False)
    report: object | None = None  # tfb_core.report.FitReport, when fit_posterior ran the search


def criterion_value(criterion: Criterion, probs: torch.Tensor, targets: torch.Tensor,
                    base_nll: float, base_acc: float, gold: bool) -> float:
    """The criterion at one sigma; ``probs`` (N, C) is the K-sample model average."""
    if criterion in (Criterion.NLL, Criterion.REFERENCE):
        change = (nll(probs, targets) - base_nll) / base_nll
        return abs(change) if criterion is Criterion.NLL else change
    pred = probs.argmax(-1)
    if gold:
        return base_acc - (pred == targets).double().mean().item()
    return (pred != targets).double().mean().item()


def folds_of(n: int, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """``folds`` disjoint index sets covering range(n), seeded."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[f::folds] for f in range(folds)]


def cv_nll(probs: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    """The NLL of the tempered model average, T fitted on the other folds: probs (N, C)."""
    total = 0.0
    for test in folds_of(len(labels), folds, seed):
        train = torch.ones(len(labels), dtype=torch.bool)
        train[test] = False
        t = fit_temperature(probs[train], labels[train])
        total += nll(temper(probs[test].double(), t), labels[test]) * len(test)
    return total / len(labels)


def select_sigma_temperature(probs_by_sigma: dict[float, torch.Tensor], labels: torch.Tensor,
                             max_acc_drop: float = MAX_ACC_DROP, folds: int = 5, seed: int = SEED
                             ) -> tuple[float, float, list[SearchPoint]]:
    """cv-nll: (sigma, T, trace) from each sigma's model average (N, C); sigma 0 must be there.

    Feasible: accuracy >= accuracy at sigma 0 - ``max_acc_drop``. The feasible sigma with the
    lowest cross-fitted NLL wins (ties: the larger sigma); T is refitted on every item there.
    """
    if 0.0 not in probs_by_sigma:
        raise TFBError("cv-nll needs sigma = 0 among the candidates")
    if len(labels) < 2 * folds:
        raise TFBError(f"cv-nll with {folds} folds needs at least {2 * folds} labelled calibration items, "
                       f"got {len(labels)}")
    base_acc = accuracy(probs_by_sigma[0.0], labels)
    trace = []
    for sigma in sorted(probs_by_sigma):
        p = probs_by_sigma[sigma]
        acc = accuracy(p, labels)
        value = cv_nll(p, labels, folds, seed)
        trace.append(SearchPoint(sigma, value, base_acc - acc <= max_acc_drop + 1e-12,
                                 fit_temperature(p, labels), acc))
    best = min((p for p in trace if p.feasible), key=lambda p: (p.value, -p.sigma))
    return best.sigma, best.temperature, trace


def search_sigma(post, items: Sequence[MCItem], criterion: Criterion | str = Criterion.NLL,
                 eps: float = EPS, num_samples: int = NUM_SAMPLES, seed: int = SEED,
                 mode: Mode | str = Mode.LETTER, gold_labels: bool = False,
                 sigma_init: float = 1e-3, max_doublings: int = 20, rtol: float = 0.05,
                 max_steps: int = 20, batch_size: int = 8, chat: bool = False,
                 length_normalize: bool = False, max_acc_drop: float = MAX_ACC_DROP, folds: int = 5,
                 sigma_grid: Sequence[float] | None = None, progress: bool = True) -> SearchResult:
    """Find the sigma the criterion picks (and, for ``cv-nll``, the temperature with it).

    Parameters
    ----------
    criterion : {"nll", "accuracy", "cv-nll", "reference"}, default="nll"
    eps : float, default=0.003
        Tolerance (0.003 = 0.3% relative NLL change, the paper's). Unused by cv-nll.
    num_samples : int, default=10
        K weight samples per evaluation.
    gold_labels : bool, default=False
        Use the items' ``answer`` as targets instead of the sigma = 0 predictions (cv-nll
        always does).
    sigma_init : float, default=1e-3
        The first upper bracket point.
    rtol : float, default=0.05
        Bisection stops when ``(hi - lo) / hi < rtol`` or after ``max_steps`` steps.
    max_acc_drop : float, default=0.01
        cv-nll: the accuracy a sigma may lose against sigma = 0 (0.01 = 1 point).
    folds : int, default=5
        cv-nll: folds of the cross-fitting.
    sigma_grid : sequence of float, default=CV_GRID
        cv-nll: the candidate sigmas (0 is added).
    """
    criterion = parse_criterion(criterion)
    if criterion is Criterion.AUTO:
        raise TFBError("criterion 'auto' depends on the items: resolve it first "
                       "(tfb_core.fit.resolve_criterion), or call tfb_core.fit_posterior")
    mode = parse_mode(mode)
    if criterion in LABELLED:
        gold_labels = True
    if not eps > 0:
        raise TFBError(f"eps must be > 0, got {eps}")
    if num_samples < 1:
        raise TFBError(f"num_samples must be >= 1, got {num_samples}")
    if not items:
        raise TFBError("the calibration set is empty")
    if gold_labels:
        missing = next((i for i, it in enumerate(items) if it.answer is None), None)
        if missing is not None:
            raise TFBError(f"criterion {criterion.value!r} with gold labels needs an 'answer' on every "
                           f"calibration item; item {missing} has none")
    score = dict(mode=mode, batch_size=batch_size, chat=chat, length_normalize=length_normalize)

    s0 = score_items(post, items, num_samples=1, seed=seed, sigma=0.0, desc="sigma=0", **score)
    p0 = s0[:, 0]
    targets = torch.tensor([it.answer for it in items]) if gold_labels else p0.argmax(-1)
    base_nll = nll(p0, targets)
    base_acc = accuracy(p0, targets)
    result = dict(criterion=criterion.value, eps=eps, num_samples=num_samples, seed=seed,
                  mode=mode.value, gold_labels=gold_labels, baseline_nll=base_nll)
    if criterion is Criterion.CV_NLL:
        found = _search_cv_nll(post, items, p0, targets, sigma_grid or CV_GRID, max_acc_drop, folds,
                               result, num_samples, seed, score, progress)
        found.scored.setdefault(0.0, s0)
        return found
    if criterion in (Criterion.NLL, Criterion.REFERENCE) and base_nll <= 0:
        raise TFBError("the NLL at sigma = 0 is 0: the relative criterion is undefined; use 'accuracy'")
    tolerance = eps * len(items) if criterion is Criterion.REFERENCE else eps

    trace: list[SearchPoint] = []
    bar = tqdm(desc=f"TFB search ({criterion.value} <= {tolerance:g})", unit="step", disable=not progress)

    def evaluate(sigma: float) -> bool:
        probs = score_items(post, items, num_samples=num_samples, seed=seed, sigma=sigma,
                            desc=f"sigma={sigma:.3g}", **score).mean(1)
        value = criterion_value(criterion, probs, targets, base_nll, base_acc, gold_labels)
        trace.append(SearchPoint(sigma, value, value <= tolerance))
        bar.update(1)
        bar.set_postfix(sigma=f"{sigma:.4g}", value=f"{value:.4g}")
        log.info("sigma=%.6g %s=%.6g feasible=%s", sigma, criterion.value, value, value <= tolerance)
        return value <= tolerance

    if criterion is Criterion.REFERENCE:  # bayesian-peft: 5 bisections of [0.001, 0.015], the upper end
        _, hi = bisect(evaluate, 0.001, 0.015, steps=5)
        bar.close()
        return SearchResult(sigma=hi, trace=trace, **result)

    lo, hi = 0.0, float(sigma_init)
    for _ in range(max_doublings):  # bracket: double while feasible
        if not evaluate(hi):
            break
        lo, hi = hi, hi * 2
    else:
        log.warning("sigma %.4g is still feasible after %d doublings; stopping there", lo, max_doublings)
        hi = None
    if hi is not None:
        lo, hi = bisect(evaluate, lo, hi, max_steps, rtol)
    bar.close()
    if lo == 0.0:
        log.warning("no sigma > 0 met the criterion; the posterior is the deterministic adapter")
    return SearchResult(sigma=lo, trace=trace, **result)


def bisect(feasible, lo: float, hi: float, steps: int, rtol: float = 0.0) -> tuple[float, float]:
    """Halve [lo, hi] (``lo`` feasible, ``hi`` not) ``steps`` times, or until ``(hi - lo) / hi < rtol``."""
    for _ in range(steps):
        if (hi - lo) / hi < rtol:
            break
        mid = (lo + hi) / 2
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _search_cv_nll(post, items, p0, labels, grid, max_acc_drop, folds, result, num_samples, seed,
                   score, progress) -> SearchResult:
    if not 0 <= max_acc_drop < 1:
        raise TFBError(f"max_acc_drop must be in [0, 1), got {max_acc_drop}")
    if any(not s >= 0 for s in grid):
        raise TFBError(f"every sigma of the grid must be >= 0, got {list(grid)}")
    probs, scored = {0.0: p0.double()}, {}
    for sigma in tqdm(sorted(set(grid) - {0.0}), desc="TFB cv-nll grid", unit="sigma", disable=not progress):
        scored[sigma] = score_items(post, items, num_samples=num_samples, seed=seed, sigma=sigma,
                                    desc=f"sigma={sigma:.3g}", **score)
        probs[sigma] = scored[sigma].mean(1).double()
        log.info("sigma=%.6g accuracy=%.4f", sigma, accuracy(probs[sigma], labels))
    sigma, temperature, trace = select_sigma_temperature(probs, labels, max_acc_drop, folds, seed)
    log.info("cv-nll: sigma=%.6g T=%.4g (cross-fitted NLL %.4f)", sigma, temperature,
             next(p.value for p in trace if p.sigma == sigma))
    return SearchResult(sigma=sigma, trace=trace, temperature=temperature, scored=scored, **result)
