"""Everything ``tfb bayesianize`` (and a start-up search) fits on a calibration set.

1. With labels on every item, a seeded ``holdout`` fraction is set aside; the rest fits.
2. sigma by the criterion (TFB_SPEC §4) on the fitting items; ``auto`` is ``cv-nll`` (sigma and
   the temperature together) when every item has an answer, else the paper's ``nll``.
3. The temperature of the model average, fitted on the fitting items when they are labelled
   (``cv-nll`` fits it with sigma).
4. On the held-out items, scored exactly as traffic will be (same K, seed, scoring, T): the
   conformal scores and the per-item uncertainty and correctness (:mod:`tfb_core.conformal`),
   from which prediction sets at any coverage and an abstention threshold at any risk follow.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .conformal import Metric, Score, calibrate, holdout_split, parse_metric, parse_score
from .data import MCItem
from .errors import TFBError
from .scoring import parse_mode, score_items
from .search import LABELLED, Criterion, SearchResult, parse_criterion
from .uncertainty import fit_temperature

log = logging.getLogger(__name__)

AUTO = "auto"


def resolve_criterion(criterion: str, items: Sequence[MCItem]) -> Criterion:
    """``auto``: ``cv-nll`` when every item has an answer, else ``nll``."""
    if criterion == AUTO:
        return Criterion.CV_NLL if all(it.answer is not None for it in items) else Criterion.NLL
    return parse_criterion(criterion)


def unlabelled(items: Sequence[MCItem]) -> int | None:
    """The index of the first item without an answer, or None."""
    return next((i for i, it in enumerate(items) if it.answer is None), None)


def fit_posterior(post, items: Sequence[MCItem], criterion: str = AUTO, holdout: float | None = None,
                  coverage: float = 0.9, score: Score | str = Score.LAC,
                  abstain_on: Metric | str = Metric.MI, max_risk: float = 0.1, delta: float = 0.05,
                  temperature: bool = True, num_samples: int = 10, seed: int = 0, mode="letter",
                  chat: bool = False, length_normalize: bool = False, batch_size: int = 8,
                  progress: bool = True, **search) -> SearchResult:
    """Search sigma, fit T, record the held-out calibration; sets ``post.config``.

    holdout : float, default=None
        The fraction of items held out for prediction sets and abstention; None: 0.5 when every
        item is labelled, else 0 (none). Needs labels on every item when > 0.
    temperature : bool, default=True
        Fit the temperature of the model average on the (labelled) fitting items.
    search : the other keyword arguments of :func:`tfb_core.search.search_sigma`.
    """
    if not items:
        raise TFBError("the calibration set is empty")
    crit = resolve_criterion(criterion, items)
    missing = unlabelled(items)
    if crit in LABELLED and missing is not None:
        raise TFBError(f"criterion {crit.value!r} needs an 'answer' on every calibration item; "
                       f"item {missing + 1} has none")
    holdout = (0.5 if missing is None else 0.0) if holdout is None else holdout
    if holdout > 0 and missing is not None:
        raise TFBError(f"prediction sets and abstention need an 'answer' on every calibration item; "
                       f"item {missing + 1} has none")
    parse_score(score), parse_metric(abstain_on)
    mode = parse_mode(mode)
    fit_idx, held_idx = holdout_split(len(items), holdout, seed) if holdout > 0 else (list(range(len(items))), [])
    fit_items = [items[i] for i in fit_idx]
    common = dict(num_samples=num_samples, seed=seed, mode=mode, chat=chat,
                  length_normalize=length_normalize, batch_size=batch_size)
    log.info("calibration: %d items fit sigma%s, %d are held out for prediction sets and abstention",
             len(fit_items), " and T" if missing is None and temperature else "", len(held_idx))
    result = post.search(fit_items, criterion=crit, progress=progress, **common, **search)
    post.config.length_normalize = bool(length_normalize)
    if result.temperature is None:
        post.config.temperature = 1.0
        if temperature and unlabelled(fit_items) is None:
            probs = score_items(post, fit_items, desc="temperature", **common).mean(1)
            post.config.temperature = fit_temperature(probs, torch.tensor([it.answer for it in fit_items]))
    elif not temperature:
        post.config.temperature = 1.0
    log.info("calibration: sigma = %.6g, T = %.4g", post.sigma, post.config.temperature)
    post.config.calibration = None
    if held_idx:
        held = [items[i] for i in held_idx]
        sample_probs = score_items(post, held, desc="held-out calibration", **common)
        cal = calibrate(sample_probs, torch.tensor([it.answer for it in held]), post.config.temperature,
                        score, coverage=coverage, abstain_on=parse_metric(abstain_on).value,
                        max_risk=max_risk, delta=delta)
        post.config.calibration = cal.to_dict()
        rule = cal.risk_threshold()
        log.info("calibration: %d held-out items; %s threshold for risk <= %g: %s", cal.n, cal.abstain_on,
                 max_risk, "none certified" if rule.threshold is None else f"{rule.threshold:.4g}")
    return result
