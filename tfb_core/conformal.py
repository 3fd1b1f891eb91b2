"""Prediction sets and abstention with a stated guarantee (docs/method.md §5).

Both are fitted on labelled calibration items that were NOT used to choose sigma or the
temperature, scored exactly as traffic is served (same K, seed, scoring and temperature).

- Split conformal prediction: a choice's nonconformity is ``1 - p_c`` (LAC) or the mass of
  the choices strictly more likely than it plus ``p_c`` (APS, not randomised; tied choices
  share a score). With ``n`` calibration scores of
  the true answers, the threshold ``q`` is their ``ceil((n + 1) * coverage)``-th smallest, and
  the set ``{c : score_c <= q}`` holds the true answer with probability >= ``coverage``
  (marginally), IF the traffic is exchangeable with the calibration items. Under a shift it
  can cover far less: calibrated on ARC-Easy, the demo's 0.9 sets covered 72% of ARC-Challenge.
- Abstention: answer only when an uncertainty score (1 - the learned confidence of
  :mod:`tfb_core.confidence` by default; MI or PE) is at most a threshold chosen
  so that a binomial upper confidence bound on the error rate of the accepted calibration
  items is <= ``max_risk`` (Selection with Guaranteed Risk, Geifman & El-Yaniv 2017: a binary
  search over the sorted scores with the confidence split over its steps; the search moves
  down from the median score after a failed test, so it can miss a more permissive threshold
  that would also pass, never certify one that does not). With probability
  >= ``1 - delta`` over the calibration draw, the accepted answers' error rate is <= ``max_risk``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch

from .options import COVERAGE, DELTA, MAX_RISK, Metric, Score, parse_metric, parse_score
from .errors import TFBError


def choice_nonconformity(probs: torch.Tensor, score: Score | str = Score.LAC) -> torch.Tensor:
    """Every choice's score as the answer: probs (..., C) -> (..., C), float64."""
    p = probs.double()
    if parse_score(score) is Score.LAC:
        return 1.0 - p
    # APS: mass of the choices strictly more likely than c, plus p_c
    more = (p[..., None, :] > p[..., :, None]).double()  # [..., c, c'] = p_c' > p_c
    return (more * p[..., None, :]).sum(-1) + p


def nonconformity(probs: torch.Tensor, labels: torch.Tensor, score: Score | str = Score.LAC) -> torch.Tensor:
    """The true answers' scores: probs (N, C), labels (N,) -> (N,)."""
    return choice_nonconformity(probs, score).gather(-1, labels[:, None]).squeeze(-1)


def min_calibration_size(coverage: float) -> int:
    """The fewest calibration scores that give a finite threshold at ``coverage``, in closed form:
    ``n`` scores suffice when the rank ``ceil((n + 1) c - m)`` is at most ``n`` (``m``: the
    rank's margin), that is when ``n >= (c - m) / (1 - c)``; computed exactly, as the rank is."""
    _check_coverage(coverage)
    c = Fraction(coverage)
    return max(1, math.ceil((c - Fraction(RANK_MARGIN)) / (1 - c)))


def covers(n: int, coverage: float) -> bool:
    """Whether ``n`` calibration scores give a finite threshold at ``coverage`` (O(1))."""
    return _rank(n, coverage) <= n


def max_coverage(n: int) -> float:
    """A round coverage that ``n`` calibration scores serve, close to the largest, n / (n + 1)
    (two significant digits of 1 - coverage, rounded down; for messages)."""
    best = n / (n + 1)
    digits = max(2, math.ceil(-math.log10(1 - best)) + 1)
    c = math.floor(best * 10 ** digits) / 10 ** digits
    while c > 0 and not covers(n, c):
        c -= 10 ** -digits
    return round(c, digits)


def threshold(sorted_scores, coverage: float) -> float:
    """The ``ceil((n + 1) * coverage)``-th smallest calibration score."""
    _check_coverage(coverage)
    n = len(sorted_scores)
    k = _rank(n, coverage)
    if k > n:
        raise TFBError(f"coverage {float(coverage)!r} needs at least {min_calibration_size(coverage)} "
                       f"calibration scores; this posterior has {n}")
    return float(sorted_scores[k - 1])


def in_set(probs: torch.Tensor, q: float, score: Score | str = Score.LAC) -> torch.Tensor:
    """Which choices a set at threshold ``q`` keeps: probs (..., C) -> bool (..., C)."""
    return choice_nonconformity(probs, score) <= q + 1e-12


def prediction_set(probs: torch.Tensor, q: float, score: Score | str = Score.LAC) -> list[int]:
    """The choices whose score is at most ``q``: probs (C,) -> indices, most likely first."""
    keep = in_set(probs, q, score).nonzero().flatten().tolist()
    return sorted(keep, key=lambda c: -float(probs[c]))


RANK_MARGIN = 1e-9  # (n + 1) * 0.9 must not round up a whole rank


def _rank(n: int, coverage: float) -> int:
    """``ceil((n + 1) * coverage - RANK_MARGIN)`` in exact arithmetic (the float ``coverage`` as
    the fraction it is): at a million scores and more, a float product's rounding is larger than
    the margin, and the least ``n`` that suffices would move with it."""
    return math.ceil((n + 1) * Fraction(coverage) - Fraction(RANK_MARGIN))


def _check_coverage(coverage: float) -> None:
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage < 1:
        raise TFBError(f"coverage must be a number in (0, 1), got {coverage!r}")


# --- abstention -----------------------------------------------------------------------------


def binomial_upper(errors: int, n: int, delta: float) -> float:
    """Clopper-Pearson upper bound: the largest risk p with ``P(Bin(n, p) <= errors) >= delta``."""
    if n == 0:
        return 1.0
    if errors >= n:
        return 1.0
    lo, hi = errors / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binomial_cdf(errors, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def _binomial_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0 if k < n else 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass
class RiskThreshold:
    """An abstention threshold and the evidence behind it."""

    threshold: float | None  # answer when uncertainty <= threshold; None: no threshold is certified
    max_risk: float
    delta: float
    n: int  # calibration items
    accepted: int  # calibration items at or below the threshold
    errors: int  # wrong answers among them
    risk_bound: float  # the upper confidence bound on their error rate (<= max_risk when certified)


def risk_threshold(uncertainty: torch.Tensor, correct: torch.Tensor, max_risk: float,
                   delta: float = DELTA) -> RiskThreshold:
    """A threshold on ``uncertainty`` whose accepted items' error rate is certified <= ``max_risk``
    with confidence ``1 - delta``: the last one to pass in the SGR binary search over the sorted
    scores (Bonferroni over its ``ceil(log2 n) + 1`` tests), or None when none passes."""
    if not 0 < max_risk < 1:
        raise TFBError(f"max_risk must be in (0, 1), got {max_risk!r}")
    if not 0 < delta < 1:
        raise TFBError(f"delta must be in (0, 1), got {delta!r}")
    u = uncertainty.double().flatten()
    wrong = ~correct.bool().flatten()
    n = len(u)
    if n == 0:
        raise TFBError("an abstention threshold needs at least one calibration item")
    order = torch.argsort(u, stable=True)
    u_sorted, wrong_sorted = u[order], wrong[order]
    steps = math.ceil(math.log2(n)) + 1  # enough tests for a binary search over n thresholds
    best = RiskThreshold(None, max_risk, delta, n, 0, 0, 1.0)
    lo, hi, tested = 0, n - 1, set()
    while lo <= hi and len(tested) < steps:
        mid = (lo + hi + 1) // 2
        if mid in tested:
            break
        tested.add(mid)
        theta = float(u_sorted[mid])
        accepted = int((u_sorted <= theta).sum())  # ties at theta are all accepted
        errors = int(wrong_sorted[:accepted].sum())
        bound = binomial_upper(errors, accepted, delta / steps)
        if bound <= max_risk:
            best = RiskThreshold(theta, max_risk, delta, n, accepted, errors, bound)
            lo = mid + 1
        else:
            hi = mid - 1
    return best


# --- what tfb_config.json stores -----------------------------------------------------------


@dataclass
class Calibration:
    """Held-out calibration evidence: conformal scores and per-item (uncertainty, correct).

    Everything needed to build prediction sets at any coverage and an abstention threshold at
    any risk target, recorded with the settings it was scored under.
    """

    score: str  # Score
    scores: list[float]  # the true answers' nonconformity, sorted ascending
    mutual_information: list[float]  # per item
    predictive_entropy: list[float]
    correct: list[bool]
    coverage: float = COVERAGE  # the default coverage of a prediction set
    abstain_on: str = Metric.MI.value
    max_risk: float = MAX_RISK
    delta: float = DELTA
    items_sha256: str | None = None  # of the items it was computed on
    confidence: list[float] | None = None  # per item: the learned confidence (None: not fitted)
    abstain_on_set: bool = False  # also abstain when the default-coverage set holds several choices

    @property
    def n(self) -> int:
        return len(self.scores)

    @classmethod
    def from_dict(cls, data, where: str = "tfb_config.json") -> "Calibration":
        if not isinstance(data, dict):
            raise TFBError(f"{where}: 'calibration' must be an object, got {type(data).__name__}")
        try:
            cal = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as e:
            raise TFBError(f"{where}: 'calibration' is incomplete: {e}") from None
        lists = (cal.scores, cal.mutual_information, cal.predictive_entropy, cal.correct)
        if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1 or not cal.scores:
            raise TFBError(f"{where}: 'calibration' needs non-empty lists scores, mutual_information, "
                           f"predictive_entropy, correct of one length")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                   for v in lists[:3] for x in v) or not all(isinstance(x, bool) for x in cal.correct):
            raise TFBError(f"{where}: 'calibration' lists must hold finite numbers (correct: booleans)")
        if cal.confidence is not None and (not isinstance(cal.confidence, list) or len(cal.confidence) != cal.n
                                           or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      and 0 <= x <= 1 for x in cal.confidence)):
            raise TFBError(f"{where}: 'calibration.confidence' must list one number in [0, 1] per item")
        if not isinstance(cal.abstain_on_set, bool):
            raise TFBError(f"{where}: 'calibration.abstain_on_set' must be true or false")
        if cal.scores != sorted(cal.scores):
            raise TFBError(f"{where}: 'calibration.scores' must be sorted ascending")
        for check in (lambda: parse_score(cal.score), lambda: parse_metric(cal.abstain_on)):
            try:
                check()
            except TFBError as e:
                raise TFBError(f"{where}: 'calibration': {e}") from None
        if parse_metric(cal.abstain_on) is Metric.CONFIDENCE and cal.confidence is None:
            raise TFBError(f"{where}: 'calibration' abstains on confidence but records none")
        for name in ("coverage", "max_risk", "delta"):
            value = getattr(cal, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise TFBError(f"{where}: 'calibration.{name}' must be a number in (0, 1), got {value!r}")
        return cal

    def to_dict(self) -> dict:
        return asdict(self)

    def uncertainty(self, metric: Metric | str | None = None) -> torch.Tensor:
        """Per item, the score a threshold is put on (accept at or below it): 1 - confidence, MI or PE."""
        metric = parse_metric(metric or self.abstain_on)
        if metric is Metric.CONFIDENCE:
            if self.confidence is None:
                raise TFBError("this calibration records no confidence; abstain on mutual_information "
                               "or predictive_entropy, or refit it with tfb bayesianize")
            return 1.0 - torch.tensor(self.confidence, dtype=torch.float64)
        return torch.tensor(getattr(self, metric.value), dtype=torch.float64)

    def risk_threshold(self, max_risk: float | None = None, metric: Metric | str | None = None,
                       delta: float | None = None) -> RiskThreshold:
        return risk_threshold(self.uncertainty(metric), torch.tensor(self.correct),
                              self.max_risk if max_risk is None else max_risk,
                              self.delta if delta is None else delta)

    def covers(self, coverage: float) -> bool:
        """Whether these items are enough for a prediction set of ``coverage`` (:func:`covers`)."""
        return covers(self.n, coverage)

    def max_coverage(self) -> float:
        """The highest coverage these items support (:func:`max_coverage`)."""
        return max_coverage(self.n)

    @staticmethod
    def min_size(coverage: float) -> int:
        """The fewest held-out items a prediction set of ``coverage`` needs (:func:`min_calibration_size`)."""
        return min_calibration_size(coverage)

    def decide(self, probs: torch.Tensor, uncertainty: dict[str, float], coverage: float | None = None,
               risk: RiskThreshold | None = None, abstain_on_set: bool | None = None) -> "Decision":
        """One answer's prediction set and abstention (:func:`decide`)."""
        return decide(self, probs, uncertainty, coverage, risk, abstain_on_set)


def calibrate(sample_probs: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
              score: Score | str = Score.LAC, confidence=None, **settings) -> Calibration:
    """The calibration evidence of held-out items: sample_probs (N, K, C), labels (N,).

    confidence : tfb_core.confidence.Confidence, default=None
        The fitted confidence model (fitted on other items); its value per item is recorded.
    """
    from .uncertainty import decompose

    u = decompose(sample_probs.double(), temperature)
    s = nonconformity(u.probs, labels, score)
    conf = None if confidence is None else confidence.of(sample_probs, temperature).tolist()
    return Calibration(score=parse_score(score).value, scores=sorted(s.tolist()),
                       mutual_information=u.mutual_information.tolist(),
                       predictive_entropy=u.predictive_entropy.tolist(),
                       correct=(u.probs.argmax(-1) == labels).tolist(), confidence=conf, **settings)


@dataclass
class Decision:
    """A served answer's prediction set and abstention."""

    indices: list[int]
    coverage: float
    threshold: float
    abstain: bool
    reasons: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # per reason: set, uncertified or uncertainty


def decide(cal: Calibration, probs: torch.Tensor, uncertainty: dict[str, float], coverage: float | None = None,
           risk: RiskThreshold | None = None, abstain_on_set: bool | None = None) -> Decision:
    """The prediction set of one answer (probs (C,)) at ``coverage`` and whether to abstain:
    when its score (``uncertainty[cal.abstain_on]``: ``confidence``, MI or PE) is past the
    threshold certified for the risk target, or none is certified; and, with
    ``abstain_on_set`` (default: the calibration's), when the set is not a single choice."""
    coverage = cal.coverage if coverage is None else coverage
    abstain_on_set = cal.abstain_on_set if abstain_on_set is None else abstain_on_set
    q = threshold(cal.scores, coverage)
    indices = prediction_set(probs, q, cal.score)
    reasons, kinds = [], []
    if abstain_on_set and len(indices) != 1:
        reasons.append(f"the {float(coverage)!r} prediction set holds {len(indices)} choices")
        kinds.append("set")
    risk = risk or cal.risk_threshold()
    metric = parse_metric(cal.abstain_on)
    value = uncertainty[metric.value]
    if risk.threshold is None:
        kinds.append("uncertified")
        reasons.append(f"no {metric.value} threshold certifies an error rate <= {risk.max_risk:g} "
                       f"on the {risk.n} calibration items")
    elif metric is Metric.CONFIDENCE and 1.0 - value > risk.threshold:
        kinds.append("uncertainty")
        reasons.append(f"confidence {value:.4g} is below {1.0 - risk.threshold:.4g}, the lowest certified "
                       f"for an error rate <= {risk.max_risk:g}")
    elif metric is not Metric.CONFIDENCE and value > risk.threshold:
        kinds.append("uncertainty")
        reasons.append(f"{metric.value} {value:.4g} is above {risk.threshold:.4g}, the threshold "
                       f"certified for an error rate <= {risk.max_risk:g}")
    return Decision(indices, coverage, q, bool(reasons), reasons, kinds)


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit, held_out) indices of ``n`` calibration items: a seeded ``fraction`` is held out
    for the conformal scores and the abstention threshold, the rest fits sigma and T."""
    if not 0 < fraction < 1:
        raise TFBError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = n - max(1, round(n * fraction))
    if cut < 1:
        raise TFBError(f"{n} calibration items cannot be split {1 - fraction:g} / {fraction:g}")
    return sorted(perm[:cut]), sorted(perm[cut:])
