"""Everything ``tfb bayesianize`` (and a start-up search) fits on a calibration set.

:meth:`Posterior.fit <tfb_core.posterior.Posterior.fit>` (:func:`fit_posterior` here) fits a
posterior in memory (:func:`tfb_core.posterior.bayesianize` also saves and caches it):

1. With labels on every item, a seeded ``holdout`` fraction is set aside; the rest fits.
2. sigma by the criterion (docs/method.md §4) on the fitting items; ``auto`` is ``cv-nll`` (sigma and
   the temperature together) when every item has an answer, else the paper's ``nll``.
3. The temperature of the model average, fitted on the fitting items when they are labelled
   (``cv-nll`` fits it with sigma).
4. The learned confidence (:mod:`tfb_core.confidence`), cross-fitted on the labelled fitting
   items at the chosen sigma and T.
5. On the held-out items, scored exactly as traffic will be (same K, seed, scoring, T): the
   conformal scores and the per-item uncertainty, confidence and correctness
   (:mod:`tfb_core.conformal`), from which prediction sets at any coverage and an abstention
   threshold at any risk follow.
6. The fitting report (:mod:`tfb_core.report`): where sigma sits in its grid, the cross-fitted
   NLL and accuracy at sigma 0 and at sigma, the held-out sets' coverage and size, the certified
   risk, and warnings that say what to do; recorded as ``fit_report``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import torch

from .confidence import fit_confidence
from .conformal import Calibration, calibrate, holdout_split
from .data import LABELS, MCItem, letter_limit
from .errors import TFBError
from .options import DELTA, HOLDOUT, Mode, SearchConfig
from .report import RISKS, FitReport, ModeScore, assess, held_out_needed, near_chance
from .scoring import score_items
from .search import LABELLED, Criterion, SearchResult, cv_nll, parse_criterion
from .uncertainty import accuracy, decompose, fit_temperature, nll

log = logging.getLogger(__name__)

AUTO = Criterion.AUTO
GIVEN = "given"  # SearchResult.criterion of a sigma given, not searched


def resolve_criterion(criterion: Criterion | str, items: Sequence[MCItem]) -> Criterion:
    """``auto``: ``cv-nll`` when every item has an answer, else ``nll``."""
    criterion = parse_criterion(criterion)
    if criterion is Criterion.AUTO:
        return Criterion.CV_NLL if all(it.answer is not None for it in items) else Criterion.NLL
    return criterion


def unlabelled(items: Sequence[MCItem]) -> int | None:
    """The index of the first item without an answer, or None."""
    return next((i for i, it in enumerate(items) if it.answer is None), None)


def check_calibration(items: Sequence[MCItem], path, config: SearchConfig, sigma: float | None = None) -> None:
    """What the settings ask of a calibration file, checked before any model loads; an error names
    the flag, the file and the first line at fault.

    A labelled criterion (``cv-nll``, also ``auto`` on a fully labelled file; not with a given
    ``sigma``) or a held-out fraction needs an answer on every item; ``--mode letter`` needs
    every item to have the same number of choices (:func:`letter_problem`).
    """
    if not items:
        raise TFBError(f"{path or 'the calibration set'}: no calibration items")
    missing = unlabelled(items)
    if missing is not None:
        at = f"{path or 'the calibration set'}, {where(items, missing)} has no 'answer'"
        crit = resolve_criterion(config.criterion, items)
        if sigma is None and crit in LABELLED:
            raise TFBError(f"--criterion {crit.value} needs an 'answer' on every calibration item; {at}")
        if config.holdout:
            raise TFBError(f"--holdout {config.holdout:g} (prediction sets, abstention) needs an 'answer' on "
                           f"every calibration item; {at}")
    problem = letter_problem(items) if config.mode is Mode.LETTER else None
    if problem:
        raise TFBError(f"{path or 'the calibration set'}, {problem}: --mode letter "
                       f"{LETTER_RULE.removeprefix('letter mode ')}")


def fit_posterior(post, items: Sequence[MCItem], config: SearchConfig | None = None, *,
                  sigma: float | None = None, delta: float = DELTA, progress: bool = True,
                  **options) -> SearchResult:
    """Search sigma, fit T, record the held-out calibration and the fitting report; sets ``post.config``.

    config : SearchConfig, default=None
        What to fit and how (:class:`SearchConfig`'s defaults when None). Its ``mode`` None
        (the default) chooses the scoring mode by measurement (:func:`choose_mode`).
    sigma : float, default=None
        Use this sigma instead of searching one; everything else is fitted as usual (the mode,
        T, the confidence and the held-out calibration, as the config and the labels allow).
    options : fields of :class:`SearchConfig` overriding ``config`` (``criterion="nll"``,
        ``num_samples=4``, ...), and the other keyword arguments of
        :func:`tfb_core.search.search_sigma` (``rtol``, ``folds``, ...).
    delta : float, default=0.05
        Abstention thresholds are certified with confidence ``1 - delta``.
    """
    names = SearchConfig.__dataclass_fields__
    cfg = replace(config or SearchConfig(), **{k: v for k, v in options.items() if k in names})
    search = {k: v for k, v in options.items() if k not in names}
    search.update(eps=cfg.eps, max_acc_drop=cfg.max_acc_drop, gold_labels=cfg.gold_labels,
                  sigma_grid=cfg.sigma_grid)
    if sigma is not None and not sigma >= 0:
        raise TFBError(f"sigma must be >= 0, got {sigma}")
    check_calibration(items, None, cfg, sigma=sigma)
    crit = resolve_criterion(cfg.criterion, items)
    missing = unlabelled(items)
    holdout = (HOLDOUT if missing is None else 0.0) if cfg.holdout is None else cfg.holdout
    post.stochastic_layers = cfg.stochastic_layers
    fit_idx, held_idx = holdout_split(len(items), holdout, cfg.seed) if holdout > 0 else (list(range(len(items))), [])
    fit_items = [items[i] for i in fit_idx]
    labelled = unlabelled(fit_items) is None
    mode, length_normalize, mode_choice, modes = choose_mode(post, items, fit_items, cfg, labelled)
    problem = letter_problem(items)
    mode_note = f"letter not a candidate: {problem}" if mode_choice == "measured" and problem else ""
    asked_norm = cfg.length_normalize  # None: tfb's to choose
    cfg = replace(cfg, mode=mode, length_normalize=length_normalize)
    common = dict(num_samples=cfg.num_samples, seed=cfg.seed, mode=cfg.mode, chat=cfg.chat,
                  length_normalize=cfg.length_normalize, batch_size=cfg.batch_size)
    log.info("calibration: %d items fit sigma%s, %d are held out for prediction sets and abstention",
             len(fit_items), " and T" if missing is None and cfg.temperature else "", len(held_idx))
    if sigma is None:
        result = post._search(fit_items, criterion=crit, progress=progress, **common, **search)
    else:
        result = given_sigma(post, sigma, cfg)
    post.config.length_normalize = cfg.length_normalize
    fit_probs = None
    if labelled:  # the search's own scores at the chosen sigma when it has them
        fit_probs = result.scored.get(post.sigma)
        if fit_probs is None or (post.sigma > 0 and fit_probs.shape[1] != cfg.num_samples):
            fit_probs = score_items(post, fit_items, desc="fitting items", **common)
    fit_labels = torch.tensor([it.answer for it in fit_items]) if labelled else None
    if result.temperature is None:
        post.config.temperature = 1.0
        if cfg.temperature and labelled:
            post.config.temperature = fit_temperature(fit_probs.mean(1), fit_labels)
    elif not cfg.temperature:
        post.config.temperature = 1.0
    log.info("calibration: sigma = %.6g, T = %.4g", post.sigma, post.config.temperature)
    confidence = fit_confidence(fit_probs, fit_labels, post.config.temperature, seed=cfg.seed) if labelled else None
    post.config.confidence = None if confidence is None else confidence.to_dict()
    if confidence is not None:
        log.info("calibration: confidence %s (cross-fitted log loss %s on %d fitting items)", confidence.model,
                 ", ".join(f"{k} {v:.4f}" for k, v in confidence.cv_log_loss.items()) or "-", confidence.n)
    post.config.calibration = None
    report = FitReport(sigma=post.sigma, temperature=post.config.temperature, mode=cfg.mode.value,
                       length_normalize=cfg.length_normalize, criterion=None if sigma is not None else crit.value,
                       mode_choice=mode_choice, modes=modes, mode_note=mode_note, calibration_items=len(items),
                       fit_items=len(fit_items), labelled=labelled,
                       coverage=cfg.coverage, max_risk=cfg.max_risk, delta=delta, num_samples=cfg.num_samples,
                       confidence_model=None if confidence is None else confidence.model,
                       **grid_place(result), **chance_of(fit_items))
    if labelled:
        p0 = sigma0_probs(result, post, fit_items, common)
        report_fit_numbers(report, result, p0, fit_probs.mean(1), fit_labels, cfg.seed)
        if not report.modes and near_chance(report):  # a given mode at chance: would another do better?
            report.modes = measure_modes(post, fit_items, mode_candidates(items, asked_norm), cfg)
    if held_idx:
        held = [items[i] for i in held_idx]
        sample_probs = score_items(post, held, desc="held-out calibration", **common)
        labels = torch.tensor([it.answer for it in held])
        cal = calibrate(sample_probs, labels, post.config.temperature,
                        cfg.score, confidence=confidence, coverage=cfg.coverage, abstain_on=cfg.abstain_on.value,
                        max_risk=cfg.max_risk, delta=delta, abstain_on_set=cfg.abstain_on_set)
        post.config.calibration = cal.to_dict()
        rule = cal.risk_threshold()
        log.info("calibration: %d held-out items; %s threshold for risk <= %g: %s", cal.n, cal.abstain_on,
                 cfg.max_risk, "none certified" if rule.threshold is None else f"{rule.threshold:.4g}")
        report_held_out(report, cal, sample_probs, labels, post.config.temperature)
    post.config.fit_report = assess(report).to_dict()
    result.report = report
    return result


def given_sigma(post, sigma: float, cfg: SearchConfig) -> SearchResult:
    """No search: ``sigma`` as given, recorded as set by hand (criterion None, no trace)."""
    post.sigma = sigma
    post.config.criterion, post.config.eps, post.config.search_trace = None, None, []
    post.config.num_samples, post.config.seed, post.config.mode = cfg.num_samples, cfg.seed, cfg.mode
    return SearchResult(sigma=sigma, criterion=GIVEN, eps=cfg.eps, num_samples=cfg.num_samples, seed=cfg.seed,
                        mode=cfg.mode.value, gold_labels=cfg.gold_labels)


# --- the scoring mode ------------------------------------------------------------------------------

LETTER_RULE = (f"letter mode needs the same number of choices (at most {len(LABELS)}, labels A-Z) on every "
               f"calibration item; pass --mode sequence, or leave --mode out and tfb chooses the mode")


def where(items: Sequence[MCItem], index: int) -> str:
    """``line N`` of the file an item was read from, else ``item N`` (1-based)."""
    line = items[index].line
    return f"line {line}" if line is not None else f"item {index + 1}"


def letter_problem(items: Sequence[MCItem]) -> str | None:
    """Why letter mode cannot score these items alike (choice counts differ, or over 26), or None."""
    first = len(items[0].choices)
    for i, it in enumerate(items):
        if letter_limit(len(it.choices)):
            return f"{where(items, i)} has {len(it.choices)} choices, more than the {len(LABELS)} labels A-Z"
        if len(it.choices) != first:
            return f"{where(items, i)} has {len(it.choices)} choices but {where(items, 0)} has {first}"
    return None


def mode_candidates(items: Sequence[MCItem], length_normalize: bool | None) -> list[tuple[Mode, bool]]:
    """Letter (when :func:`letter_problem` finds nothing) and sequence, with and without length
    normalisation unless ``length_normalize`` says which."""
    norms = (False, True) if length_normalize is None else (length_normalize,)
    letter = [] if letter_problem(items) else [(Mode.LETTER, False)]
    return letter + [(Mode.SEQUENCE, n) for n in norms]


def measure_modes(post, items: Sequence[MCItem], candidates, cfg: SearchConfig) -> list[ModeScore]:
    """Each candidate's accuracy and cross-fitted NLL at sigma 0, K 1 on labelled ``items``."""
    labels = torch.tensor([it.answer for it in items])
    out = []
    for mode, norm in candidates:
        p0 = score_items(post, items, mode=mode, num_samples=1, seed=cfg.seed, sigma=0.0, chat=cfg.chat,
                         length_normalize=norm, batch_size=cfg.batch_size, desc=f"{mode.value} at sigma 0")[:, 0]
        p0 = p0.double()
        out.append(ModeScore(mode.value, norm, accuracy(p0, labels), crossfit_nll(p0, labels, cfg.seed)))
    return out


def choose_mode(post, items, fit_items, cfg: SearchConfig, labelled: bool
                ) -> tuple[Mode, bool, str, list[ModeScore]]:
    """(mode, length_normalize, how it was chosen, the measured candidates).

    ``cfg.mode`` given: it. Else, with answers on the fitting items: the candidate of
    :func:`mode_candidates` with the highest accuracy, then the lowest cross-fitted NLL, at
    sigma 0 (K = 1) on them. Without answers: letter (sequence when letter cannot score the items).
    """
    norm = cfg.length_normalize
    if cfg.mode is not None:
        return cfg.mode, bool(norm), "given", []
    if not labelled:
        if letter_problem(items):
            return Mode.SEQUENCE, bool(norm), f"no answers to measure by; not letter: {letter_problem(items)}", []
        return Mode.LETTER, bool(norm), "the default: no answers to measure by", []
    modes = measure_modes(post, fit_items, mode_candidates(items, norm), cfg)
    best = min(modes, key=lambda m: (-m.accuracy, m.nll))
    log.info("calibration: %s mode chosen by accuracy, then cross-fitted NLL, at sigma 0: %s", best.name,
             ", ".join(f"{m.name} {m.accuracy:.1%} / {m.nll:.4f}" for m in modes))
    return Mode(best.mode), best.length_normalize, "measured", modes


# --- the report's numbers ---------------------------------------------------------------------------


def grid_place(result: SearchResult) -> dict:
    """The evaluated sigmas, the chosen one's index in them (cv-nll's grid) and the edge it sits at."""
    if result.criterion == GIVEN:
        return dict(grid=[], grid_index=None, edge=None)
    grid = sorted({p.sigma for p in result.trace})
    if result.criterion == Criterion.CV_NLL.value:
        index = grid.index(result.sigma)
        positive = [s for s in grid if s > 0]
        edge = None
        if result.sigma > 0 and result.sigma == positive[-1] and len(positive) > 1:
            edge = "top"
        elif result.sigma > 0 and result.sigma == positive[0] and len(positive) > 1:
            edge = "bottom"
        return dict(grid=grid, grid_index=index, edge=edge)
    # bisection: at the top when no evaluated sigma above the chosen one was rejected
    above = [p for p in result.trace if p.sigma > result.sigma]
    edge = "top" if result.sigma > 0 and not any(not p.feasible for p in above) else None
    return dict(grid=grid, grid_index=None, edge=edge)


def chance_of(items: Sequence[MCItem]) -> dict:
    """Chance accuracy (the mean of 1 / choices) and the choice counts as text."""
    counts = [len(it.choices) for it in items]
    lo, hi = min(counts), max(counts)
    return dict(chance=sum(1 / c for c in counts) / len(counts), choices=f"{lo}" if lo == hi else f"{lo}-{hi}")


def sigma0_probs(result: SearchResult, post, items, common: dict) -> torch.Tensor:
    """The fitting items' model average at sigma 0 (K = 1): (N, C); the search's when it scored it."""
    if 0.0 in result.scored:
        return result.scored[0.0][:, 0].double()
    return score_items(post, items, **{**common, "num_samples": 1}, sigma=0.0, desc="sigma=0")[:, 0].double()


def crossfit_nll(probs: torch.Tensor, labels: torch.Tensor, seed: int, folds: int = 5) -> float:
    """5-fold cross-fitted NLL (T fitted on the other folds); the plain NLL under 2 x folds items."""
    if len(labels) < 2 * folds:
        return nll(probs, labels)
    return cv_nll(probs, labels, folds, seed)


def report_fit_numbers(report: FitReport, result: SearchResult, p0: torch.Tensor, avg: torch.Tensor,
                       labels: torch.Tensor, seed: int) -> None:
    """Cross-fitted NLL and accuracy at sigma 0 and at sigma: cv-nll's own trace when it ran, else
    computed the same way from the model averages ``p0`` and ``avg`` (N, C)."""
    trace = {p.sigma: p for p in result.trace} if result.criterion == Criterion.CV_NLL.value else {}
    if 0.0 in trace and report.sigma in trace:
        report.nll_0, report.accuracy_0 = trace[0.0].value, trace[0.0].accuracy
        report.nll_sigma, report.accuracy_sigma = trace[report.sigma].value, trace[report.sigma].accuracy
        return
    report.nll_0, report.accuracy_0 = crossfit_nll(p0, labels, seed), accuracy(p0, labels)
    report.nll_sigma, report.accuracy_sigma = crossfit_nll(avg.double(), labels, seed), accuracy(avg, labels)


def report_held_out(report: FitReport, cal: Calibration, sample_probs: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> None:
    """The held-out items' set coverage and size at the default coverage (as ``tfb eval --coverage``
    counts them), the smallest certified risk of :data:`RISKS` and the share answered at max_risk."""
    from .evaluate import set_metrics

    report.held_out = cal.n
    probs = decompose(sample_probs.double(), temperature).probs
    sets = set_metrics(probs, labels, cal, [cal.coverage], valid=sample_probs.amax(1) > 0)[f"{cal.coverage:g}"]
    if sets is not None:
        report.set_coverage, report.set_size = sets["coverage"], sets["size"]
    report.certified_risk = next((r for r in RISKS if cal.risk_threshold(r).threshold is not None), None)
    rule = cal.risk_threshold()
    report.answered = rule.accepted / rule.n if rule.threshold is not None else 0.0
    report.held_out_needed = held_out_needed(cal.max_risk, cal.delta)
